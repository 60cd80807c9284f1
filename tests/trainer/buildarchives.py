"""Build archives for tests: a stand-in build packed as a user would upload it, and hostile ones."""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trainer.standin import builtin_build

GZIP = "application/gzip"
ZIP = "application/zip"


@dataclass(frozen=True)
class Entry:
    """One tar member: a file (data), a directory (data None), or a link (link set)."""

    name: str
    data: bytes | None = b""
    mode: int = 0o644
    type: bytes = tarfile.REGTYPE
    link: str = ""


def tar_gz(entries: list[Entry]) -> bytes:
    """A .tar.gz holding exactly `entries`, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mode = entry.mode
            info.type = tarfile.DIRTYPE if entry.data is None else entry.type
            info.linkname = entry.link
            if entry.data is not None and info.type == tarfile.REGTYPE:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def standin_tar_gz(name: str, directory: Path) -> bytes:
    """The stand-in build `name` as an uploadable .tar.gz: the player, plus a data directory."""
    player = builtin_build(name, directory)
    return tar_gz(
        [
            Entry(name, player.read_bytes(), 0o755),
            Entry(f"{name}_Data", None, 0o755),
            Entry(f"{name}_Data/README.txt", b"stand-in build data\n"),
        ]
    )


def zip_archive(files: dict[str, bytes], unix_modes: dict[str, int] | None = None) -> bytes:
    """A .zip of `files`; with `unix_modes`, those members carry Unix modes (as zip -y makes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if unix_modes and name in unix_modes:
                info.create_system = 3
                info.external_attr = unix_modes[name] << 16
            else:
                info.create_system = 0  # made on Windows: no modes at all
            archive.writestr(info, data)
    return buffer.getvalue()
