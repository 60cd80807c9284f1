"""Disjoint port ranges for concurrent mlagents-learn runs on one machine.

mlagents-learn serves environment worker `i` on `base_port + i`, and two trainers that start
together can both bind one port (the server sets `so_reuseport`), so every run gets a block of its
own. Inside a process a set of taken blocks keeps runs apart; across processes (several train
nodes on one machine) an advisory `flock` on one lock file per block does, and the kernel drops it
when the process dies, so a crashed node never leaks a block.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BLOCK_SIZE = 20  # mlagents-learn takes at most 16 environments per run (JobSpec.num_envs)


class NoFreePortsError(RuntimeError):
    """Every port block is in use."""


@dataclass
class PortBlock:
    """Ports `base` .. `base + size - 1`, held until `release()`."""

    base: int
    size: int
    _release: Callable[[], None] | None = field(repr=False)

    def release(self) -> None:
        """Give the block back (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release()


class PortAllocator:
    """Hands out blocks of `block_size` ports from `base`, never the same block twice at once."""

    def __init__(
        self,
        base: int,
        *,
        blocks: int = 32,
        block_size: int = DEFAULT_BLOCK_SIZE,
        first_block: int = 0,
        lock_dir: Path | None = None,
    ) -> None:
        if base < 1024 or base + blocks * block_size > 65536:
            raise ValueError(f"ports {base}..{base + blocks * block_size} are out of range")
        self.base = base
        self.blocks = blocks
        self.block_size = block_size
        # A node starts its search at its own slot index, so nodes on one machine rarely collide.
        self.first_block = first_block % blocks
        self.lock_dir = lock_dir or Path(tempfile.gettempdir()) / "trainyard-ports"
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def allocate(self) -> PortBlock:
        """Take a free block; raises NoFreePortsError if there is none."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for offset in range(self.blocks):
                index = (self.first_block + offset) % self.blocks
                if index in self._taken:
                    continue
                base = self.base + index * self.block_size
                fd = os.open(self.lock_dir / f"{base}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)  # another process holds this block
                    continue
                self._taken.add(index)
                return PortBlock(base, self.block_size, _Releaser(self, index, fd))
        raise NoFreePortsError(
            f"all {self.blocks} port blocks from {self.base} are in use "
            f"(block size {self.block_size})"
        )

    def _free(self, index: int, fd: int) -> None:
        with self._lock:
            self._taken.discard(index)
            os.close(fd)  # closing drops the flock


@dataclass
class _Releaser:
    allocator: PortAllocator
    index: int
    fd: int

    def __call__(self) -> None:
        self.allocator._free(self.index, self.fd)
