"""Uploaded environment builds: the archive rules the gateway checks and train nodes unpack by.

A build is a `.tar.gz` or `.zip` of a Unity Linux (dedicated server) player, or of anything
that plays its part. One set of rules, applied member by member while the archive is read:

- a readable gzip-compressed tar or zip (the format is told by the first bytes);
- only regular files and directories: no symbolic or hard links, devices, FIFOs, sparse or
  encrypted members;
- relative paths only: no absolute path, no `..`, no backslash or NUL, no name twice, no name
  that is both a file and a directory;
- at most `max_files` members, and at most `max_unpacked_bytes` once unpacked (also what a
  compressed stream may expand to), so a small archive cannot fill a disk;
- exactly one **player** at the top level: a file with an executable bit (tar mode, or a zip's
  Unix mode) or named `*.x86_64` (Unity's name for a Linux player, which also covers zips made
  on Windows, which carry no modes). Shared libraries (`*.so`, `*.so.N`) and `*.debug` files are
  not players, so Unity's `UnityPlayer.so` next to `Game.x86_64` is fine.

Unpacking applies the same rules and writes files itself (never `extractall`): directories
0755, files 0644, or 0755 when their archive mode had an executable bit, and the player 0755.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3
CHUNK_SIZE = 1024 * 1024
MAX_NAME_BYTES = 255  # one path component, as Linux file systems allow
MAX_PATH_CHARS = 1024
# tarfile reads a pax or GNU long-name header in one call: larger than this is refused before
# it is read, so a compressed header of zeros cannot fill the memory.
MAX_READ = 4 * CHUNK_SIZE
TAR_OVERHEAD_PER_MEMBER = 4096  # headers, long names and padding of one member, generously

ArchiveKind = Literal["tar.gz", "zip"]
_LIBRARY = re.compile(r".*\.so(\.[0-9]+)*|.*\.debug")
# mlagents_envs.env_utils strips these anywhere in --env and globs it (see trainer.standin).
_MANGLED = (".app", ".exe", ".x86", "*", "?", "[")


class ArchiveError(ValueError):
    """The archive breaks one of the rules; the message says which, and where."""


@dataclass(frozen=True)
class ArchiveLimits:
    """How large a build may be once unpacked."""

    max_files: int = 50_000
    max_unpacked_bytes: int = 8 * GIB


class ArchiveSettings(BaseSettings):
    """Limits of unpacked builds, read from TRAINYARD_* variables by the gateway and train nodes."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    build_max_files: int = Field(
        50_000, ge=1, le=10_000_000, description="most files and directories a build may hold"
    )
    build_unpacked_limit_bytes: int = Field(
        8 * GIB, ge=1024, description="largest total size of a build's files once unpacked"
    )

    def limits(self) -> ArchiveLimits:
        """These settings as the limits `check_archive` and `unpack_archive` take."""
        return ArchiveLimits(self.build_max_files, self.build_unpacked_limit_bytes)


@dataclass(frozen=True)
class BuildInfo:
    """What a valid build archive holds."""

    kind: ArchiveKind
    player: str  # the file name of the player at the top level
    files: int  # regular files
    unpacked_bytes: int


@dataclass(frozen=True)
class _Member:
    name: str  # as stored in the archive
    is_dir: bool
    executable: bool
    size: int
    open: Callable[[], IO[bytes]]


def archive_kind(path: Path) -> ArchiveKind:
    """The archive's format, from its first bytes; ArchiveError if it is neither."""
    with Path(path).open("rb") as file:
        head = file.read(4)
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if not head:
        raise ArchiveError("the archive is empty (0 bytes)")
    raise ArchiveError(
        f"not a .tar.gz or .zip archive (it starts with {head!r}, neither gzip nor zip)"
    )


def check_archive(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> BuildInfo:
    """Read the whole archive and apply every rule, writing nothing; ArchiveError if one fails."""
    return _walk(Path(path), limits, None)


def unpack_archive(
    path: Path,
    destination: Path,
    limits: ArchiveLimits = ArchiveLimits(),
) -> BuildInfo:
    """Unpack into `destination` (an empty directory, created if missing) by the same rules.

    On ArchiveError `destination` may hold part of the build: the caller discards it.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    if any(destination.iterdir()):
        raise ValueError(f"{destination} is not empty")
    info = _walk(Path(path), limits, destination)
    os.chmod(destination / info.player, 0o755)  # noqa: S103 -- a build is run by its node
    # mkdir's modes went through the umask: make every directory readable and searchable.
    os.chmod(destination, 0o755)  # noqa: S103
    for root, dirnames, _files in os.walk(destination):
        for name in dirnames:
            os.chmod(os.path.join(root, name), 0o755)  # noqa: S103
    return info


def is_player_candidate(name: str, executable: bool) -> bool:
    """Whether a top-level file counts as the player: executable or `*.x86_64`, not a library."""
    if _LIBRARY.fullmatch(name):
        return False
    return executable or name.endswith(".x86_64")


def _safe_parts(name: str) -> tuple[str, ...]:
    if "\x00" in name:
        raise ArchiveError(f"member {name!r} has a NUL character in its name")
    if "\\" in name:
        raise ArchiveError(f"member {name!r} has a backslash in its path; separate with '/'")
    if name.startswith("/"):
        raise ArchiveError(f"member {name!r} has an absolute path")
    if len(name) > MAX_PATH_CHARS:
        raise ArchiveError(f"member {name[:60]!r}… has a path over {MAX_PATH_CHARS} characters")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"member {name!r} has '..' in its path")
    for part in parts:
        if len(part.encode("utf-8", errors="surrogateescape")) > MAX_NAME_BYTES:
            raise ArchiveError(f"member {name!r} has a name over {MAX_NAME_BYTES} bytes")
    return parts


def _walk(path: Path, limits: ArchiveLimits, destination: Path | None) -> BuildInfo:
    kind = archive_kind(path)
    members = _tar_members if kind == "tar.gz" else _zip_members
    files: set[str] = set()
    directories: set[str] = set()
    top: dict[str, bool] = {}  # top-level file -> executable bit
    count = total = 0
    try:
        for member in members(path, limits):
            count += 1
            if count > limits.max_files:
                raise ArchiveError(f"the archive holds more than {limits.max_files} members")
            parts = _safe_parts(member.name)
            if not parts:
                if member.is_dir:
                    continue  # "./", the archive's own root
                raise ArchiveError(f"member {member.name!r} is a file without a name")
            relative = "/".join(parts)
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in files:
                    raise ArchiveError(f"{parent!r} is both a file and a directory in the archive")
                directories.add(parent)
            if member.is_dir:
                if relative in files:
                    raise ArchiveError(
                        f"{relative!r} is both a file and a directory in the archive"
                    )
                directories.add(relative)
                if destination is not None:
                    (destination / relative).mkdir(mode=0o755, parents=True, exist_ok=True)
                continue
            if relative in files:
                raise ArchiveError(f"{relative!r} appears twice in the archive")
            if relative in directories:
                raise ArchiveError(f"{relative!r} is both a file and a directory in the archive")
            files.add(relative)
            total += member.size
            if total > limits.max_unpacked_bytes:
                raise ArchiveError(
                    f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes"
                )
            if len(parts) == 1:
                top[relative] = member.executable
            _copy(member, relative, destination)
    except ArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError) as error:
        raise ArchiveError(f"not a readable {kind} archive: {error}") from None
    except (NotImplementedError, RuntimeError) as error:  # zip: unknown compression, encryption
        raise ArchiveError(f"unsupported {kind} archive: {error}") from None
    return BuildInfo(kind, _player(top), len(files), total)


def _copy(member: _Member, relative: str, destination: Path | None) -> None:
    """Read the member's bytes (all of them: that checks the CRC), writing them if asked."""
    target: IO[bytes] | None = None
    if destination is not None:
        path = destination / relative
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        mode = 0o755 if member.executable else 0o644
        # O_EXCL|O_NOFOLLOW: nothing in the archive can make this write land elsewhere.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        os.fchmod(fd, mode)  # the umask may have taken bits away
        target = os.fdopen(fd, "wb")
    read = 0
    with contextlib.ExitStack() as stack:
        if target is not None:
            stack.enter_context(target)
        source = stack.enter_context(member.open())
        while chunk := source.read(CHUNK_SIZE):
            read += len(chunk)
            if read > member.size:
                raise ArchiveError(f"member {relative!r} holds more than its declared size")
            if target is not None:
                target.write(chunk)
    if read != member.size:
        raise ArchiveError(f"member {relative!r} is shorter than its declared size")


def _player(top: dict[str, bool]) -> str:
    candidates = sorted(
        name for name, executable in top.items() if is_player_candidate(name, executable)
    )
    if not candidates:
        raise ArchiveError(
            "no player at the top level of the archive: expected one file with an executable"
            " bit or named *.x86_64"
            + (f" (top-level files: {', '.join(sorted(top)[:10])})" if top else " (none)")
        )
    if len(candidates) > 1:
        raise ArchiveError(
            f"several possible players at the top level: {', '.join(candidates[:10])};"
            " expected exactly one executable file (or *.x86_64)"
        )
    player = candidates[0]
    if any(part in player.removesuffix(".x86_64") for part in _MANGLED):
        raise ArchiveError(
            f"mlagents-learn cannot launch a player named {player!r}"
            " (avoid '.app', '.exe', '.x86', '*', '?' and '[' in its name)"
        )
    return player


# --- formats ----------------------------------------------------------------------------


class _BoundedStream:
    """The decompressed tar stream, refused past `limit` bytes or in reads over MAX_READ."""

    def __init__(self, source: gzip.GzipFile, limit: int) -> None:
        self.source = source
        self.limit = limit

    def _past_limit(self) -> ArchiveError:
        return ArchiveError(f"the archive unpacks to more than {self.limit} bytes")

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_READ:
            raise ArchiveError(f"the archive has a tar header larger than {MAX_READ} bytes")
        # One byte past the limit at most: enough to tell that the stream goes on beyond it.
        data = self.source.read(min(size, self.limit + 1 - self.source.tell()))
        if self.source.tell() > self.limit:
            raise self._past_limit()
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise ArchiveError("unexpected seek in a tar stream")
        if offset > self.limit:
            raise self._past_limit()
        return self.source.seek(offset)

    def tell(self) -> int:
        return self.source.tell()


def _tar_members(path: Path, limits: ArchiveLimits) -> Iterator[_Member]:
    limit = limits.max_unpacked_bytes + (limits.max_files + 4) * TAR_OVERHEAD_PER_MEMBER
    with gzip.open(path, "rb") as compressed:
        stream = _BoundedStream(compressed, limit)
        # Mode "r:" on our own stream: every read of tarfile goes through the bounds above.
        with tarfile.open(fileobj=stream, mode="r:") as tar:  # type: ignore[call-overload]
            while (info := tar.next()) is not None:
                yield _tar_member(tar, info)
                tar.members.clear()  # a member list of a large archive is not kept
            # The rest of the stream (padding) is read too, so that the gzip CRC is checked.
            while stream.read(CHUNK_SIZE):
                pass


def _tar_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> _Member:
    kinds = {
        "symbolic link": info.issym(),
        "hard link": info.islnk(),
        "device": info.ischr() or info.isblk(),
        "FIFO": info.isfifo(),
        "sparse file": info.issparse(),
    }
    for what, found in kinds.items():
        if found:
            raise ArchiveError(f"member {info.name!r} is a {what}; only files and directories")
    if not (info.isreg() or info.isdir()):
        raise ArchiveError(f"member {info.name!r} has unsupported tar type {info.type!r}")

    def open_member() -> IO[bytes]:
        source = tar.extractfile(info)
        assert source is not None  # a regular file
        return source

    return _Member(
        info.name,
        info.isdir(),
        bool(info.mode & 0o111),
        0 if info.isdir() else info.size,
        open_member,
    )


def _zip_members(path: Path, _limits: ArchiveLimits) -> Iterator[_Member]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            yield _zip_member(archive, info)


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: made on Unix
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise ArchiveError(
            f"member {info.filename!r} is a symbolic link; only files and directories"
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(f"member {info.filename!r} is not a file or a directory")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"member {info.filename!r} is encrypted")
    is_dir = info.is_dir() or kind == stat.S_IFDIR
    return _Member(
        info.filename,
        is_dir,
        bool(mode & 0o111),
        0 if is_dir else info.file_size,
        lambda: archive.open(info),
    )
