"""`trainyard demo` end to end, as a user runs it: local mode, training, the model pushed."""

from __future__ import annotations

import hashlib
import re

import onnx
import psutil
import pytest

from tests.cli.conftest import LocalEnv, trainyard

pytestmark = pytest.mark.slow


def test_the_demo_trains_receives_and_verifies_a_model(local_env: LocalEnv):
    result = trainyard(
        "demo", "--data-dir", str(local_env.data_dir), env=local_env.env, timeout=290
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr

    # Live progress came over the WebSocket, report by report, up to the last step.
    assert re.search(r"step 1000/20000\s+mean reward", out)
    assert re.search(r"step 20000/20000\s+mean reward", out)
    assert re.search(r"model received: \d+ bytes, sha256 [0-9a-f]{64} verified", out)

    summary = out[out.index("Summary") :]
    model_path = re.search(r"model\s+(\S+\.onnx)", summary)
    sha256 = re.search(r"model sha256\s+([0-9a-f]{64}) \(verified; onnx.checker passed\)", summary)
    rewards = re.search(
        r"mean reward\s+(-?\d+\.\d+) at step 1000 → (-?\d+\.\d+) at step 20000 \(20 reports\)",
        summary,
    )
    assert model_path, summary
    assert sha256, summary
    assert rewards, summary
    assert re.search(r"wall time\s+\d+:\d\d \(\d+ s, local mode start to stop\)", summary)
    assert "demo finished" in out

    model = local_env.data_dir.resolve() / "received"
    path = model / model_path[1].rsplit("/", 1)[-1]
    assert str(path) == model_path[1]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256[1]
    onnx.checker.check_model(onnx.load(str(path)))
    # GridGoal visibly learned: from a near-random policy to reaching the goal.
    assert float(rewards[2]) > float(rewards[1]) + 0.3

    # Local mode was stopped: nothing runs from the demo's data directory any more.
    data_dir = str(local_env.data_dir.resolve())
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(data_dir in part for part in proc.info["cmdline"] or []):
            leftovers.append(proc)
    assert leftovers == []
