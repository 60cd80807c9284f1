"""trainer.launcher's in-process additions to mlagents-learn."""

from __future__ import annotations

import json
import multiprocessing
import time
from queue import Empty

import pytest
from mlagents.trainers.stats import StatsAggregationMethod, StatsSummary

from trainer.launcher import _idle_waiting, make_stats_writer


def test_stats_writer_appends_one_json_line_per_summary(tmp_path):
    path = tmp_path / "stats" / "run.jsonl"
    writer = make_stats_writer(path)
    average = StatsAggregationMethod.AVERAGE
    writer.write_stats(
        "Reach",
        {
            "Environment/Cumulative Reward": StatsSummary([1.0, 3.0], average),
            "Empty": StatsSummary([], average),
        },
        1000,
    )
    # Flushed per line: readable while the run goes on.
    first = json.loads(path.read_text())
    assert first["kind"] == "summary"
    assert first["category"] == "Reach"
    assert first["step"] == 1000
    assert first["stats"] == {
        "Environment/Cumulative Reward": {"mean": 2.0, "std": 1.0, "count": 2}
    }
    writer.write_stats("Reach", {"Is Training": StatsSummary([1.0], average)}, 2000)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1000, 2000]


def test_idle_waiting_get_drains_then_blocks():
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    get = _idle_waiting(queue, timeout_s=0.2)
    queue.put(1)
    queue.put(2)
    time.sleep(0.1)  # let the feeder thread flush
    assert get() == 1
    assert get() == 2
    # Right after an item: Empty at once, so a draining caller can return what it has.
    started = time.monotonic()
    with pytest.raises(Empty):
        get()
    assert time.monotonic() - started < 0.1
    # Asked again with nothing new: the caller is spinning, so the call waits for an item.
    with pytest.raises(Empty):
        get()
    queue.put(3)
    assert get() == 3
    queue.close()
    queue.join_thread()
