"""Metric definitions on hand-made records: exact values, as vLLM's `bench serve` defines them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from muxserve.bench.client import RequestRecord, RunResult
from muxserve.bench.metrics import SLO, latency_stats, run_to_json, summarize, tpot
from muxserve.bench.probe import parse_prometheus, peak_and_mean


def rec(
    model: str, ttft: float | None, latency: float | None, out: int, **kw: object
) -> RequestRecord:
    itl = [0.1] * max(out - 1, 0) if latency is not None else []
    return RequestRecord(0, model, 0.0, 0.0, 10, out, ttft, itl, latency, **kw)  # type: ignore[arg-type]


RECORDS = [
    rec("a", 0.1, 1.0, 10),  # TPOT (1.0 - 0.1) / 9 = 0.1
    rec("a", 0.5, 0.5, 1),  # one token: no TPOT (0 for the SLO check)
    rec("b", 0.2, 2.2, 11),  # TPOT 0.2
    rec("b", None, None, 0, error="HTTP 404: no such model", status=404),
]


def test_tpot() -> None:
    assert tpot(RECORDS[0]) == pytest.approx(0.1)
    assert tpot(RECORDS[1]) is None
    assert tpot(RECORDS[2]) == pytest.approx(0.2)
    assert tpot(RECORDS[3]) is None


def test_slo_parse_and_check() -> None:
    slo = SLO.parse(["ttft:300", "tpot:150"])
    assert slo == SLO(ttft_s=0.3, tpot_s=0.15)
    assert [slo.met(r) for r in RECORDS] == [True, False, False, False]  # ttft, tpot, failed
    assert SLO.parse(["e2el:1500"]).met(RECORDS[0]) and SLO.parse(["tpot:1"]).met(RECORDS[1])
    assert SLO.parse([]).empty and slo.to_json() == {"ttft_ms": 300.0, "tpot_ms": 150.0}
    for bad in (["ttfb:3"], ["ttft:x"], ["ttft:0"]):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_summary() -> None:
    s = summarize(RECORDS, 2.0, SLO.parse(["ttft:300", "tpot:150"]))
    o = s["overall"]
    assert (o["requests"], o["completed"], o["failed"]) == (4, 3, 1)
    assert (o["input_tokens"], o["output_tokens"]) == (30, 22)
    assert o["request_throughput"] == 1.5 and o["output_throughput"] == 11.0
    assert o["total_token_throughput"] == 26.0
    assert o["goodput"] == 0.5 and o["slo_attainment"] == 0.25  # 1 good of 4 sent
    assert o["ttft_ms"]["p50"] == pytest.approx(200.0) and o["ttft_ms"]["mean"] == pytest.approx(
        800 / 3
    )
    assert o["tpot_ms"]["mean"] == pytest.approx(150.0)  # (100 + 200) / 2
    assert o["itl_ms"]["p99"] == pytest.approx(100.0) and len(RECORDS[0].itl) == 9
    assert o["e2el_ms"]["p90"] == pytest.approx(np.percentile([1000, 500, 2200], 90))
    a, b = s["models"]["a"], s["models"]["b"]
    assert (a["requests"], b["requests"], b["failed"]) == (2, 2, 1)
    assert a["slo_attainment"] == 0.5 and b["slo_attainment"] == 0.0
    assert a["request_throughput"] + b["request_throughput"] == o["request_throughput"]
    assert summarize(RECORDS, 2.0, SLO())["overall"]["goodput"] is None


def test_stats_of_nothing() -> None:
    assert latency_stats([]) == {"mean": None, "std": None, "p50": None, "p90": None, "p99": None}
    assert latency_stats([1.0, 2.0])["p50"] == 1500.0


def test_run_json_roundtrips() -> None:
    run = RunResult(RECORDS, 2.0, 5, "time limit", 1.0, (1.0, 2.0, 3.0))
    data = json.loads(json.dumps(run_to_json(run, SLO(), rate=4.0)))
    assert (data["sent"], data["trace_requests"], data["stopped"]) == (4, 5, "time limit")
    assert data["errors"] == {"HTTP 404: no such model": 1}
    assert [r["model"] for r in data["requests"]] == ["a", "a", "b", "b"]
    assert "requests" not in run_to_json(run, SLO(), requests=False)


def test_prometheus_parsing_and_peaks() -> None:
    text = (
        "# HELP muxserve_kv_blocks_used KV blocks the model holds\n"
        "# TYPE muxserve_kv_blocks_used gauge\n"
        'muxserve_kv_blocks_used{model="a"} 12.0\n'
        'muxserve_kv_blocks_used{model="b"} 3.0\n'
        "muxserve_kv_blocks_total 320.0\n"
        "muxserve_requests_total 7\n"
    )
    vals = parse_prometheus(text, ["muxserve_kv_blocks_used", "muxserve_kv_blocks_total"])
    assert vals == {
        'muxserve_kv_blocks_used{model="a"}': 12.0,
        'muxserve_kv_blocks_used{model="b"}': 3.0,
        "muxserve_kv_blocks_total": 320.0,
    }
    samples = [(0.0, {"x": 1.0}), (0.1, {"x": 5.0}), (0.2, {})]
    assert peak_and_mean(samples, "x") == (5.0, 3.0) and peak_and_mean(samples, "y") is None
