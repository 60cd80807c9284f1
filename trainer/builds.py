"""Where a job's environment build comes from on a train node.

`{"builtin": name}` is a stand-in build written under `{builds_dir}/builtin/`. `{"sha256": hash}`
is an uploaded build: the archive stored in the model store under `builds/{hash}` (see
`gateway/builds.py`), unpacked once per node into `{builds_dir}/{hash}/`, whose one executable
file at the top (shared libraries aside) is the player.

A missing build is fetched on first use: the archive is downloaded next to the target and
checked against its hash, unpacked by the rules of `trainer.archive` into a temporary
directory, and renamed into place. The rename is atomic, so a run never sees half a build;
when two runs fetch the same build at once, the first rename wins and the other copy is
discarded. A fetch cut short by a crash leaves its temporary files behind; the node removes
them when it next starts (`sweep_stale_fetches`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO

from domain.spec import EnvRef
from trainer.archive import ArchiveError, ArchiveLimits, is_player_candidate, unpack_archive
from trainer.modelstore import (
    CHUNK_SIZE,
    IntegrityError,
    ModelStore,
    ModelStoreError,
    ObjectNotFoundError,
    validate_key,
)
from trainer.standin import builtin_build

SHA256 = re.compile(r"[0-9a-f]{64}")
"""The name of an uploaded build's directory."""


class EnvError(Exception):
    """The job's environment build cannot be run on this node."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable  # the trouble is the node's or the store's, not the build's


def build_key(sha256: str) -> str:
    """The model store key of an uploaded build's archive: builds/{sha256}."""
    return validate_key(f"builds/{sha256}")


def resolve_env(
    env: EnvRef,
    builds_dir: Path,
    store: ModelStore | None = None,
    limits: ArchiveLimits = ArchiveLimits(),  # noqa: B008
) -> Path:
    """The executable of the job's build, fetched from `store` if need be (blocks).

    Raises EnvError saying why there is none.
    """
    if env.builtin is not None:
        try:
            return builtin_build(env.builtin, builds_dir / "builtin")
        except KeyError as error:
            raise EnvError(str(error.args[0])) from None
        except ValueError as error:
            raise EnvError(str(error)) from None
    assert env.sha256 is not None
    directory = builds_dir / env.sha256
    for _ in range(2):  # again if an unused build was swept away at this very moment
        if not directory.is_dir():
            if store is None:
                raise EnvError(f"build {env.sha256} is not on this node (no directory {directory})")
            fetch_build(store, env.sha256, builds_dir, limits)
        try:
            # Marked used now: what `sweep_unused_builds` goes by.
            os.utime(directory)
            return find_player(directory, env.sha256)
        except FileNotFoundError:
            continue
    raise EnvError(f"build {env.sha256} kept disappearing from {directory}")


def find_player(directory: Path, sha256: str) -> Path:
    """The one executable file at the top of an unpacked build (shared libraries aside)."""
    executables = sorted(
        p
        for p in directory.iterdir()
        if not p.is_symlink()
        and p.is_file()
        and os.access(p, os.X_OK)
        and is_player_candidate(p.name, executable=True)
    )
    if len(executables) != 1:
        found = ", ".join(p.name for p in executables) or "none"
        raise EnvError(
            f"build {sha256}: expected one executable file in {directory}, found {found}"
        )
    return executables[0]


def fetch_build(
    store: ModelStore,
    sha256: str,
    builds_dir: Path,
    limits: ArchiveLimits = ArchiveLimits(),  # noqa: B008
) -> Path:
    """Download, check and unpack the build into `{builds_dir}/{sha256}/`; return that (blocks)."""
    target = builds_dir / sha256
    builds_dir.mkdir(parents=True, exist_ok=True)
    # Temporary names start with a dot, so they never look like a build's directory.
    fd, name = tempfile.mkstemp(dir=builds_dir, prefix=f".{sha256}.", suffix=".archive")
    archive = Path(name)
    staging: Path | None = None
    try:
        with os.fdopen(fd, "wb") as out:
            _download(store, sha256, out)
        if target.is_dir():
            return target  # another run fetched it meanwhile
        staging = Path(tempfile.mkdtemp(dir=builds_dir, prefix=f".{sha256}.", suffix=".unpack"))
        try:
            unpack_archive(archive, staging, limits)
        except ArchiveError as error:
            raise EnvError(f"build {sha256} cannot be unpacked: {error}") from None
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another run renamed its copy first: use that one, drop ours (in `finally`).
        else:
            staging = None
        return target
    finally:
        archive.unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


STALE_FETCH_S = 3600.0
"""A temporary file or directory of a fetch untouched this long was left by a crash."""


def sweep_stale_fetches(builds_dir: Path, older_than_s: float = STALE_FETCH_S) -> int:
    """Remove what fetches cut short by a crash left in `builds_dir`; returns how many.

    Only the temporaries `fetch_build` names (a dot, then the hash) and only old ones: a node
    sharing the directory may be fetching right now.
    """
    if not builds_dir.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for path in builds_dir.glob(".*.*"):
        if not path.name.endswith((".archive", ".unpack")):
            continue
        try:
            if path.lstat().st_mtime > cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another node swept it first
        removed += 1
    return removed


def sweep_unused_builds(builds_dir: Path, keep_days: float) -> list[str]:
    """Delete the uploaded builds no run used for `keep_days` days; their hashes.

    A run marks its build used when it starts (the directory's modification time), so a
    build a run uses now, on this node or another sharing the directory, is kept. A deleted
    build is fetched again if a job needs it. `keep_days` 0 keeps every build.
    """
    if keep_days <= 0 or not builds_dir.is_dir():
        return []
    cutoff = time.time() - keep_days * 86400
    removed = []
    for path in builds_dir.iterdir():
        if not SHA256.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            if path.stat().st_mtime > cutoff:
                continue
            # Renamed away first, so no run finds half a build while it is deleted.
            doomed = path.rename(builds_dir / f".{path.name}.{os.getpid()}.unpack")
        except FileNotFoundError:
            continue  # another node swept it first
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path.name)
    return sorted(removed)


def _download(store: ModelStore, sha256: str, out: IO[bytes]) -> None:
    key = build_key(sha256)
    digest = hashlib.sha256()
    try:
        with store.open(key) as reader:
            while chunk := reader.read(CHUNK_SIZE):
                digest.update(chunk)
                out.write(chunk)
    except ObjectNotFoundError:
        raise EnvError(
            f"build {sha256} is not on this node and not in the model store (no object {key})"
        ) from None
    except IntegrityError as error:
        raise EnvError(f"build {sha256}: the model store's copy is damaged: {error}") from None
    except ModelStoreError as error:
        raise EnvError(
            f"build {sha256} could not be fetched from the model store: {error}", retryable=True
        ) from None
    if digest.hexdigest() != sha256:
        raise EnvError(
            f"build {sha256}: the model store holds an archive with sha256 {digest.hexdigest()}"
        )


def sha256_file(path: Path) -> str:
    """The sha256 of a file (lowercase hex), read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
