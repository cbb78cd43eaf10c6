"""scripts/profile_vs_hf.py and scripts/bench_weight_memory.py on tiny models: their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def run_script(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,  # the scripts find this checkout's muxserve themselves
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_profile_tables_both_sides_op_by_op(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    args = ["--model", "tiny", "--point", "2x16", "--steps", "4", "--profile-steps", "2"]
    run = run_script("profile_vs_hf.py", [*args, "--out", str(out)], tmp_path)
    assert "tiny 2x16, load" in run.stdout and "clocked step, thread CPU ms" in run.stdout
    result = json.loads(out.read_text())
    assert (result["model"], result["point"]) == ("tiny", "2x16")
    assert len(result["load_average_before"]) == 3 and len(result["load_average_after"]) == 3
    for kind in ("wall_ms", "cpu_ms"):
        for side in ("hf", "engine", "ratio"):
            q = result["timing"][kind][side]
            assert 0 < q["q1"] <= q["median"] <= q["q3"], (kind, side)
    ops = result["ops_ms_per_step"]
    # tiny: hidden 64, vocab 1000; HF's activations keep a sequence axis of 1, ours are flat
    assert ops["hf"]["linear(2, 1, 64)x(1000, 64)"] > 0
    assert ops["engine"]["linear(2, 64)x(1000, 64)"] > 0
    assert ops["engine"]["index_select"] > 0 and ops["hf"]["cat"] > 0  # reading the caches
    for side in ("hf", "engine"):
        assert ops[side]["(ops per step)"] > 10 and ops[side]["(clock)"] >= 0
        assert "(outside ops)" in ops[side]
        assert result["profiled_step_ms"][side] > 0


def test_weight_memory_sides_decode_the_same_tokens(tmp_path: Path) -> None:
    shape = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4"]
    shape += ["--vocab", "1000", "--max-positions", "256", "--kv-heads", "2"]
    steps = ["--batch", "2", "--prompt", "16", "--steps", "2", "--repeats", "2"]
    args = [*shape, *steps, "--sides", "aligned", "arena", "--out", str(tmp_path)]
    run_script("bench_weight_memory.py", [*args, "--name", "skew.json"], tmp_path)
    result = json.loads((tmp_path / "skew.json").read_text())
    (row,) = result["runs"]
    assert (row["kv_heads"], row["batch"], row["prompt"]) == (2, 2, 16)
    assert row["same_tokens"] is True
    assert set(row) >= {"hf", "aligned", "arena"} and "heap" not in row
    for side in ("aligned", "arena"):
        for key in ("ms", "cpu_ms"):
            assert 0 < row[side][key]["p10"] <= row[side][key]["median"] <= row[side][key]["p90"]
        for key in ("vs_hf", "cpu_vs_hf"):
            assert 0 < row[side][key]["q1"] <= row[side][key]["median"] <= row[side][key]["q3"]
