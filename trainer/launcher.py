"""`python -m trainer.launcher <mlagents-learn args...>`: mlagents-learn, with in-process additions.

- torch 2.9+ exports ONNX with the dynamo exporter by default, which fails on ML-Agents' opset-9
  export; `torch.onnx.export` is wrapped so that it defaults to `dynamo=False`.
- ML-Agents' env manager spins on its step queue, taking a whole core from the environment on a
  small machine; it is made to block instead (same results, less CPU).
- With `TRAINYARD_STATS_FILE` set, every stats summary is appended to that file as one JSON line
  (see `make_stats_writer`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

STATS_FILE_ENV = "TRAINYARD_STATS_FILE"


def patch_onnx_export() -> None:
    """Make `torch.onnx.export` default to the TorchScript exporter (idempotent)."""
    import torch.onnx

    export = torch.onnx.export
    if getattr(export, "_trainyard_patched", False):
        return

    @functools.wraps(export)
    def legacy_export(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dynamo", False)
        return export(*args, **kwargs)

    legacy_export._trainyard_patched = True  # type: ignore[attr-defined]
    torch.onnx.export = legacy_export


def _idle_waiting(queue: Any, timeout_s: float) -> Callable[[], Any]:
    """A `get_nowait` for `queue` that blocks (up to `timeout_s`) when its caller is spinning.

    It raises `queue.Empty` at once after an item, so a caller draining the queue still stops
    there; two calls in a row with nothing in between mean the caller waits, so it blocks.
    """
    get_nowait = queue.get_nowait
    got_item = False

    def get() -> Any:
        nonlocal got_item
        try:
            item = get_nowait()
        except Empty:
            if got_item:
                got_item = False
                raise
            item = queue.get(timeout=timeout_s)
        got_item = True
        return item

    return get


def patch_env_manager_polling(timeout_s: float = 0.05) -> None:
    """Make the trainer wait for its environment workers instead of spinning (idempotent).

    SubprocessEnvManager polls its step queue with `get_nowait()` in a tight loop, so the main
    process burns a whole core while the env worker and the build wait for CPU (2 cores here).
    """
    from mlagents.trainers.subprocess_env_manager import SubprocessEnvManager

    init = SubprocessEnvManager.__init__
    if getattr(init, "_trainyard_patched", False):
        return

    @functools.wraps(init)
    def waiting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.step_queue.get_nowait = _idle_waiting(self.step_queue, timeout_s)

    waiting_init._trainyard_patched = True  # type: ignore[attr-defined]
    SubprocessEnvManager.__init__ = waiting_init


def _number(value: float) -> float | None:
    # JSON has no NaN/inf (an empty summary has a NaN mean).
    return value if math.isfinite(value) else None


def make_stats_writer(path: Path) -> Any:
    """A `mlagents.trainers.stats.StatsWriter` appending one JSON object per line to `path`.

    Summaries: `{"kind": "summary", "category": behavior, "step": n, "time": unix_s, "stats":
    {key: {"mean", "std", "count"}}}` (keys without values in the period left out). Properties,
    such as the effective hyperparameters at start: `{"kind": "property", "category", "time",
    "property": "hyperparameters", "value": {...}}`.
    """
    from mlagents.trainers.stats import StatsPropertyType, StatsSummary, StatsWriter

    class JsonLinesWriter(StatsWriter):  # type: ignore[misc]
        """Appends every summary and property as one JSON line."""

        def __init__(self) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Trainers with `threaded: true` summarize from their own threads.
            self._lock = threading.Lock()

        def write_stats(self, category: str, values: dict[str, StatsSummary], step: int) -> None:
            stats = {
                key: {
                    "mean": _number(float(summary.mean)),
                    "std": _number(float(summary.std)),
                    "count": int(summary.num),
                }
                for key, summary in values.items()
                if summary.num > 0
            }
            self._append(
                {"kind": "summary", "category": category, "step": int(step), "stats": stats}
            )

        def add_property(self, category: str, property_type: StatsPropertyType, value: Any) -> None:
            record = {"kind": "property", "category": category, "property": property_type.value}
            self._append({**record, "value": value})

        def _append(self, record: dict[str, Any]) -> None:
            line = json.dumps({**record, "time": time.time()}, sort_keys=True, default=str)
            # Opened per line (seconds apart): each line is on disk at once, nothing to close.
            with self._lock, path.open("a", encoding="utf-8") as file:
                file.write(line + "\n")

    return JsonLinesWriter()


def main() -> None:
    """Run mlagents-learn on `sys.argv` with the additions above."""
    patch_onnx_export()
    # Choosing the legacy exporter is the point; its warning would only fill the run's log.
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
    patch_env_manager_polling()
    from mlagents.trainers import learn
    from mlagents.trainers.stats import StatsReporter

    stats_file = os.environ.get(STATS_FILE_ENV)
    if stats_file:
        # StatsReporter's writers are class-wide; learn.run_training adds its own next to this one.
        StatsReporter.add_writer(make_stats_writer(Path(stats_file)))
    learn.main()


if __name__ == "__main__":
    main()
