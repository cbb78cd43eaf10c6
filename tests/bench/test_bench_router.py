"""scripts/bench_router.py end to end, at its smallest: both servers start, every request
succeeds, and the results file has what the lead reads from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_router.py"
METRICS = ["latency_1tok", "ttft_1tok_stream", "stream_gap", "stream_tokens_per_s"]


@pytest.mark.slow  # two servers and a mesh process start: about 15 s on 2 shared cores
def test_smoke(demo_models: dict[str, Path], tmp_path: Path) -> None:
    args = ["--rounds", "1", "--requests-per-round", "3", "--streams-per-round", "1"]
    args += ["--stream-tokens", "8", "--out", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "router.json").read_text())
    assert (tmp_path / "router.png").stat().st_size > 0

    assert result["requests"] == {
        kind: {t: {"sent": n, "ok": n, "errors": {}} for t in ("direct", "router")}
        for kind, n in (("latency_1tok", 3), ("ttft_1tok_stream", 3), ("stream", 1))
    }
    assert list(result["summary"]) == METRICS
    for metric in METRICS:
        s = result["summary"][metric]
        assert {"direct", "router", "router_minus_direct_p50", "router_over_direct_p50"} <= set(s)
        assert set(s["direct"]) == {"n", "p50", "p99", "pooled"}
    assert result["summary"]["stream_gap"]["direct"]["n"] == 7  # 8 tokens, one event each
    assert "paired_difference_median" in result["summary"]["latency_1tok"]
    # the router really is in front of a mesh in another process
    router_mesh = result["servers"]["router"]["health"]["meshes"]["mesh-0"]
    direct_mesh = result["servers"]["direct"]["health"]["meshes"]["local"]
    assert router_mesh["status"] == direct_mesh["status"] == "ok"
    assert router_mesh["pid"] != direct_mesh["pid"]
    assert result["servers"]["router"]["exit_code"] == result["servers"]["direct"]["exit_code"] == 0
    assert len(result["load_avg_start"]) == len(result["load_avg_end"]) == 3
