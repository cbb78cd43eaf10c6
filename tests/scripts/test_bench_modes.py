"""scripts/bench_modes.py's bookkeeping: repeats paired into ratios, claims only where every
repeat agrees, gauges found whatever the server's label order."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from muxserve.bench.client import RunResult
from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def bench_modes() -> ModuleType:
    return load_script("bench_modes")


def run(rate: float, repeat: int, p99: float, tokens: float, att: float = 1.0) -> dict[str, Any]:
    """A run's JSON as bench_modes keeps it, with only what its reports read."""
    return {
        "rate": rate,
        "repeat": repeat,
        "kv": {},
        "summary": {
            "overall": {
                "ttft_ms": {"p50": p99 / 4, "p90": p99 / 2, "p99": p99},
                "tpot_ms": {"p99": 10.0},
                "output_throughput": tokens,
                "request_throughput": rate,
                "slo_attainment": att,
                "failed": 0,
            }
        },
    }


def test_ratios_pair_runs_by_repeat_and_claims_need_every_repeat(bench_modes: ModuleType) -> None:
    results = {
        "mux": [run(4, 0, 100, 200), run(4, 1, 50, 200), run(8, 0, 100, 400), run(8, 1, 100, 400)],
        "spatial": [
            run(4, 1, 150, 100, att=0.5),  # order does not matter: paired by repeat
            run(4, 0, 400, 100, att=0.7),
            run(8, 0, 200, 400),
            run(8, 1, 50, 400),
        ],
    }
    rows = bench_modes.ratios(results)
    assert [r["rate"] for r in rows] == [4, 8]
    assert rows[0]["p99_ttft_spatial_vs_mux"] == {
        "median": 3.5,
        "min": 3.0,
        "max": 4.0,
        "per_repeat": [4.0, 3.0],
    }
    assert rows[0]["tokens_per_s_spatial_vs_mux"]["per_repeat"] == [2.0, 2.0]
    assert rows[1]["p99_ttft_spatial_vs_mux"]["per_repeat"] == [2.0, 0.5]
    lines = bench_modes.claims(rows)
    assert lines[0] == (
        "rate 4, p99_ttft vs spatial: mux better in every repeat, 3.50x (min 3.00x, max 4.00x, "
        "2 repeats)"
    )
    assert any(
        line.startswith("rate 8, p99_ttft vs spatial: no claim, the repeats disagree")
        for line in lines
    )
    assert any(line.startswith("rate 8, tokens_per_s vs spatial: no claim") for line in lines)
    # spatial's SLO attainment: median 60% at rate 4, 100% at 8
    assert bench_modes.compare_rates(results) == {"slo": 8, "throughput": 8}


def test_gauges_are_found_in_any_label_order(bench_modes: ModuleType) -> None:
    samples = [
        (0.0, {'muxserve_kv_blocks_used{mesh="local",model="a"}': 3.0}),
        (0.1, {'muxserve_kv_blocks_used{mesh="local",model="a"}': 5.0}),
    ]
    result = RunResult(records=[], duration_s=1.0, trace_requests=0, samples=samples)
    found = bench_modes.find_series(result, "muxserve_kv_blocks_used", model="a", mesh="local")
    assert found == 'muxserve_kv_blocks_used{mesh="local",model="a"}'
    assert bench_modes.find_series(result, "muxserve_kv_blocks_used", model="b", mesh="local") == ""
