"""Where a job's environment build comes from on a train node.

`{"builtin": name}` is a stand-in build written under `{builds_dir}/builtin/`. `{"sha256": hash}`
is an uploaded build unpacked in `{builds_dir}/{hash}/`, whose one executable file at the top is
the player. Uploading builds to nodes is not implemented yet, so such a build is present only if
someone put it there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from domain.spec import EnvRef
from trainer.standin import builtin_build


class EnvError(Exception):
    """The job's environment build cannot be run on this node."""


def resolve_env(env: EnvRef, builds_dir: Path) -> Path:
    """The executable of the job's build; raises EnvError saying why there is none."""
    if env.builtin is not None:
        try:
            return builtin_build(env.builtin, builds_dir / "builtin")
        except KeyError as error:
            raise EnvError(str(error.args[0])) from None
        except ValueError as error:
            raise EnvError(str(error)) from None
    assert env.sha256 is not None
    directory = builds_dir / env.sha256
    if not directory.is_dir():
        raise EnvError(f"build {env.sha256} is not on this node (no directory {directory})")
    executables = sorted(p for p in directory.iterdir() if p.is_file() and os.access(p, os.X_OK))
    if len(executables) != 1:
        found = ", ".join(p.name for p in executables) or "none"
        raise EnvError(
            f"build {env.sha256}: expected one executable file in {directory}, found {found}"
        )
    return executables[0]


def sha256_file(path: Path) -> str:
    """The sha256 of a file (lowercase hex), read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
