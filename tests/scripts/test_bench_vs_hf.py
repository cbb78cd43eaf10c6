"""scripts/bench_vs_hf.py --quick: the grid's JSON and plot, both sides' greedy tokens equal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_vs_hf.py"


def test_quick_grid(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the script finds this checkout's muxserve itself
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[tiny] cell 1/4: batch x context 1x16" in run.stderr  # progress on stderr
    result = json.loads((tmp_path / "bench_vs_hf.json").read_text())
    assert (tmp_path / "bench_vs_hf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["torch_threads"] == 1 and result["complete"] is True
    assert (result["steps"], result["repeats"]) == (2, 2)
    assert len(result["load_average_before"]) == 3 and len(result["load_average_after"]) == 3
    assert [m["name"] for m in result["models"]] == ["tiny", "tiny-gqa"]
    assert [(m["config"]["heads"], m["config"]["kv_heads"]) for m in result["models"]] == [
        (4, 4),
        (4, 2),
    ]
    for model in result["models"]:
        assert model["parameters"] > 0
        cells = model["cells"]
        assert [(c["batch"], c["prompt"]) for c in cells] == [(1, 16), (1, 40), (2, 16), (2, 40)]
        for c in cells:
            assert c["steps"] == 4  # repeats x steps paired ratios
            # the same greedy tokens on every row: tiny models, prompts too short to chunk
            assert c["rows_same_tokens"] == c["batch"], (model["name"], c["point"])
            for side in ("hf_ms", "engine_ms", "weights_read_ms"):
                assert 0 < c[side]["p10"] <= c[side]["median"] <= c[side]["p90"], side
            q = c["ratio"]
            assert 0 < q["q1"] <= q["median"] <= q["q3"]
            assert q["rep_min"] <= q["rep_max"]
            c_ = c["cpu_ratio"]
            assert 0 < c_["q1"] <= c_["median"] <= c_["q3"]
            assert c["engine_cpu_ms"]["median"] > 0 and c["hf_cpu_ms"]["median"] > 0
            assert c["weights_read_cpu_ms"]["median"] > 0
            w = c["engine_vs_weights_read_cpu"]
            assert 0 < w["q1"] <= w["median"] <= w["q3"]
            assert len(c["load_average_before"]) == 3


def test_bad_options_are_refused(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--contexts", "300", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "context 300 does not fit model tiny's positions" in run.stderr
    assert not (tmp_path / "bench_vs_hf.json").exists()


def _run(name: str, points: list[tuple[int, int]], repeats: int, complete: bool = True) -> dict:
    cell = {
        "steps": 4,
        "ratio": {"median": 1.0, "q1": 0.9, "q3": 1.1},
        "load_average_before": [1.0, 0, 0],
        "load_average_after": [1.5, 0, 0],
    }
    return {
        "command": f"run {name}",
        "complete": complete,
        "repeats": repeats,
        "steps": 8,
        "load_average_before": [0.5, 0, 0],
        "load_average_after": [2.5, 0, 0],
        "models": [
            {
                "name": "m",
                "parameters": 1e6,
                "config": {"heads": 4, "kv_heads": 2},
                "cells": [
                    {**cell, "point": f"{b}x{c}", "batch": b, "prompt": c, "source": name}
                    for b, c in points
                ],
            }
        ],
    }


def test_merge_combines_runs_into_one_grid(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run("a", [(16, 128), (1, 128)], 4)))
    b.write_text(json.dumps(_run("b", [(1, 2048), (16, 128)], 3)))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--merge", str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "bench_vs_hf.json").read_text())
    [model] = result["models"]
    # batch x context order; the cell measured twice keeps the later file's
    assert [(c["point"], c["source"]) for c in model["cells"]] == [
        ("1x128", "a"),
        ("1x2048", "b"),
        ("16x128", "b"),
    ]
    assert (result["repeats"], result["steps"]) == ("3/4", "8")
    assert [r["command"] for r in result["runs"]] == ["run a", "run b"]
    assert (out / "bench_vs_hf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_refuses_an_unfinished_run(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_run("a", [(1, 128)], 3, complete=False)))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--merge", str(a), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "an unfinished run (complete is false)" in run.stderr
    assert not (tmp_path / "out" / "bench_vs_hf.json").exists()
