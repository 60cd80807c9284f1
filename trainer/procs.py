"""Finding and killing every process of a run, however it was started and wherever it went.

mlagents-learn starts each Unity build in a session of its own, and a build whose trainer dies is
re-parented away from the train node, so a run's processes are found three ways: the trainer's
process group, its descendants (collected while they are still descendants), and every process
whose command line mentions the run's directory (the build's `-logFile` lies under it).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

import psutil


def descendants(pid: int) -> set[psutil.Process]:
    """The process's descendants now (empty if it is gone)."""
    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def mentioning(text: str) -> set[psutil.Process]:
    """Every process (other than this one) with `text` in one of its command-line arguments."""
    found = set()
    me = os.getpid()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.pid != me and any(text in arg for arg in cmdline):
            found.add(proc)
    return found


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Signal a process group that may already be gone; never this process's own group."""
    if pgid <= 1 or pgid == os.getpgrp():
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def kill_all(procs: Iterable[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGKILL each process and the group it leads; reap them; return any that survived."""
    alive = []
    for proc in procs:
        # is_running() compares the start time too, so a reused pid is never killed.
        if not proc.is_running():
            continue
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(proc.pid) == proc.pid:
                signal_group(proc.pid, signal.SIGKILL)  # a build leads its own group
            proc.kill()
            alive.append(proc)
    # Reaps those that are this process's children (zombies otherwise), waits for the rest.
    _gone, survivors = psutil.wait_procs(alive, timeout=timeout)
    return survivors
