"""Supervised child processes: each in its own session, its output forwarded line by line.

A child's exit is noticed without reaping it (`waitid` with WNOWAIT), so its process group id
cannot be reused before the final sweep kills whatever is left in the group; the processes it
started are remembered (pid and start time) and killed too if it leaves them behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TextIO

import psutil

TAIL_LINES = 30
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # FastStream colours its logs even into a pipe


def describe_exit(info: os.waitid_result) -> str:
    """How a process ended, from its `waitid` result."""
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        try:
            return f"killed by {signal.Signals(info.si_status).name}"
        except ValueError:
            return f"killed by signal {info.si_status}"
    return f"exit code {info.si_status}"


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes a child get SIGTERM if the supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


class Output:
    """Where the supervisor and its children write: the terminal, or a log file per child."""

    def __init__(self, stream: TextIO, log_dir: Path | None, width: int) -> None:
        self.stream = stream
        self.log_dir = log_dir
        self.width = width
        self.lock = threading.RLock()
        self.files: dict[str, IO[str]] = {}
        self.colours = stream.isatty()

    def say(self, text: str, *, err: bool = False) -> None:
        """A message of the supervisor's own."""
        stream = sys.stderr if err and self.stream is sys.stdout else self.stream
        with self.lock:
            for line in text.splitlines() or [""]:
                stream.write(f"{'trainyard':<{self.width}} | {line}\n")
            stream.flush()

    def child_line(self, name: str, line: str) -> None:
        """One line a child wrote."""
        with self.lock:
            if self.log_dir is not None or not self.colours:
                line = _ANSI.sub("", line)
            if self.log_dir is None:
                self.stream.write(f"{name:<{self.width}} | {line}\n")
                self.stream.flush()
                return
            file = self.files.get(name)
            if file is None:
                file = self.files[name] = (self.log_dir / f"{name}.log").open("a", encoding="utf-8")
            file.write(line + "\n")
            file.flush()

    def close(self) -> None:
        """Close the log files."""
        with self.lock:
            for file in self.files.values():
                file.close()
            self.files.clear()


class Child:
    """One supervised process, in its own session; its output goes through `Output`."""

    def __init__(self, name: str, args: list[str], stop_timeout: float) -> None:
        self.name = name
        self.args = args
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.reader: threading.Thread | None = None
        self.descendants: dict[int, float] = {}  # pid -> create time, to never kill a stranger
        self.status: str | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, env: Mapping[str, str], output: Output) -> None:
        """Start the process and the thread that forwards its output."""
        self.proc = subprocess.Popen(
            self.args,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),  # only prctl, resolved before the fork
        )
        self.reader = threading.Thread(
            target=self._forward, args=(output,), name=f"local-{self.name}", daemon=True
        )
        self.reader.start()

    def _forward(self, output: Output) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.tail.append(_ANSI.sub("", line))
            output.child_line(self.name, line)

    def exited(self) -> bool:
        """Whether the process has ended; it stays unreaped (its pid and group stay ours)."""
        if self.proc is None or self.proc.returncode is not None:
            return True
        if self.status is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere: gone, its status unknown
            self.status = "exit status unknown"
            return True
        if info is None or info.si_pid == 0:
            return False
        self.status = describe_exit(info)
        return True

    def close(self) -> None:
        """Wait for the last of its output (after `finish`) and close the pipe."""
        if self.reader is not None:
            self.reader.join(timeout=5)
            if self.reader.is_alive():
                return  # something outside the supervisor's reach still holds the pipe
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def note_descendants(self) -> None:
        """Remember the processes the child started, to kill any it leaves behind."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.descendants[proc.pid] = proc.create_time()

    def terminate(self) -> None:
        """Ask the process to stop."""
        if not self.exited():
            os.kill(self.pid, signal.SIGTERM)

    def finish(self) -> list[psutil.Process]:
        """Kill the process, its group and what it started; reap it; return what was killed."""
        if self.proc is None or self.proc.returncode is not None:
            return []
        self.note_descendants()
        # The child is alive or an unreaped zombie, so its group id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        killed: list[psutil.Process] = []
        for pid, created in self.descendants.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                    killed.append(proc)
        self.proc.wait()
        if self.status is None:
            self.status = f"exit code {self.proc.returncode}"
        return killed


def set_subreaper() -> None:
    """Make orphaned descendants children of this process (Linux), for `sweep_own_children`.

    A killed train node's trainers, for one, then come back here instead of to init.
    """
    if sys.platform.startswith("linux"):
        pr_set_child_subreaper = 36
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def sweep_own_children() -> None:
    """Kill and reap every remaining descendant of this process."""
    leftovers = psutil.Process().children(recursive=True)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=5)
