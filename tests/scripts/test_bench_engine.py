"""scripts/bench_engine.py's scheduler part: a tiny run's fields, and a scheduler-only run
keeping the throughput measured last, with that run's load average."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.scripts import load_script

TINY = ["--skip-throughput", "--running", "8", "--rounds", "3", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench_engine() -> ModuleType:
    return load_script("bench_engine")


def run(bench_engine: ModuleType, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(sys, "argv", ["bench_engine.py", *TINY, "--out", str(out)])
    assert bench_engine.main() == 0
    return json.loads((out / "bench_engine.json").read_text())


def test_a_scheduler_run_counts_every_sequence_step(
    bench_engine: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (row,) = run(bench_engine, tmp_path, monkeypatch)["scheduler_overhead"]
    assert (row["running"], row["models"], row["rounds"], row["repeats"]) == (8, 4, 3, 1)
    assert row["seq_steps_per_round"] == 8  # every request decodes every round


def test_a_scheduler_only_run_keeps_the_last_throughput(
    bench_engine: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = {"load_average_before": [5.0, 6.0, 7.0], "throughput": [{"policy": "adbs"}]}
    (tmp_path / "bench_engine.json").write_text(json.dumps(earlier))
    first = run(bench_engine, tmp_path, monkeypatch)
    assert first["throughput"] == [{"policy": "adbs"}]
    assert first["throughput_load_average_before"] == [5.0, 6.0, 7.0]
    second = run(bench_engine, tmp_path, monkeypatch)  # the throughput's load, not the first's
    assert second["throughput_load_average_before"] == [5.0, 6.0, 7.0]
    assert second["load_average_before"] != [5.0, 6.0, 7.0]


def test_without_an_earlier_file_there_is_no_throughput(
    bench_engine: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(bench_engine, tmp_path, monkeypatch)
    assert "throughput" not in result and "throughput_load_average_before" not in result
