"""The committed AsyncAPI document is what `faststream docs gen` makes of the code now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.json"


def test_the_committed_asyncapi_document_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    # Defaults only: no TRAINYARD_* variables, and no .env in the working directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "faststream",
            "docs",
            "gen",
            "handlers.app:app",
            "--app-dir",
            str(ROOT),
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    # Compared as data: FastStream's channel order is not stable between runs.
    assert json.loads(out.read_text()) == json.loads(COMMITTED.read_text()), (
        "docs/asyncapi.json is stale: run `faststream docs gen handlers.app:app "
        "--out docs/asyncapi.json`"
    )
