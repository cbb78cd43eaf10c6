"""scripts/gen_workload.py end to end: the popularity modes and model copies on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from muxserve.bench.trace import read_trace

ROOT = Path(__file__).resolve().parents[2]


def gen(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_workload.py"), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_long_tail_over_copies(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    r = gen(
        tmp_path,
        *("--models", "a", "b", "--copies", "3", "--popularity", "longtail"),
        *("--rate", "6", "--duration", "20", "--seed", "0", "--out", str(out)),
    )
    assert r.returncode == 0, r.stderr
    trace = read_trace(out)
    names = ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert trace.meta["models"] == names
    counts = Counter(e.model for e in trace.entries)
    assert set(counts) <= set(names) and sum(counts.values()) == len(trace.entries)
    assert f"wrote {len(trace.entries)} requests over 20s" in r.stderr


def test_shifting_and_bad_copies(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    r = gen(
        tmp_path,
        *("--models", "a", "b", "--popularity", "shifting", "--shift-phases", "2"),
        *("--rate", "4", "--duration", "10", "--out", str(out)),
    )
    assert r.returncode == 0, r.stderr
    assert read_trace(out).meta["shift_phases"] == 2
    bad = gen(tmp_path, "--copies", "0", "--out", str(out))
    assert bad.returncode == 2 and "--copies must be at least 1, got 0" in bad.stderr
    bad = gen(tmp_path, "--popularity", "shifting", "--ramp", "staggered", "--out", str(out))
    assert bad.returncode == 2 and "sets the rates over time" in bad.stderr
