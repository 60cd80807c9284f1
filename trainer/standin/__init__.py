"""Stand-in Unity builds: small Python executables that play the Unity side of ML-Agents' gRPC
protocol, so `mlagents-learn --env=PATH` trains them exactly as it trains a Unity player."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from trainer.standin.envs import ENVIRONMENTS

BUILTIN_NAMES: tuple[str, ...] = tuple(sorted(ENVIRONMENTS))

# mlagents_envs.env_utils strips these substrings anywhere in --env (and globs the path), so a
# path containing them would name a file that does not exist.
_MANGLED = (".app", ".exe", ".x86_64", ".x86", "*", "?", "[")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _script(name: str) -> str:
    return (
        f"#!{sys.executable}\n"
        f'"""Stand-in Unity build {name!r}, written by trainer.standin.builtin_build."""\n'
        "import sys\n\n"
        f"sys.path.insert(0, {str(_PROJECT_ROOT)!r})\n"
        "from trainer.standin.__main__ import main\n\n"
        f"sys.exit(main([{name!r}, *sys.argv[1:]]))\n"
    )


def builtin_build(name: str, directory: Path) -> Path:
    """The executable of the built-in build `name` under `directory`, written there if missing.

    Raises KeyError for an unknown name, ValueError for a directory mlagents-learn cannot use.
    """
    if name not in ENVIRONMENTS:
        raise KeyError(f"unknown built-in build {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    path = Path(directory).resolve() / name
    if any(part in str(path) for part in _MANGLED):
        raise ValueError(f"mlagents-learn cannot launch a build at {path} (see env_utils)")
    if any(c.isspace() for c in sys.executable) or len(sys.executable) > 120:
        raise ValueError(f"interpreter path {sys.executable!r} cannot be used in a shebang")
    text = _script(name)
    if path.is_file() and os.access(path, os.X_OK) and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary file and renamed, so a concurrent run never launches half a script.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}-")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(tmp, 0o755)  # noqa: S103 -- a build is an executable anyone may run
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
