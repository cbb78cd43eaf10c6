"""`muxserve bench` as a real process: results and plots on disk; Ctrl-C keeps partial results."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from muxserve.bench.trace import write_trace
from muxserve.engine import MuxEngine
from tests.bench.conftest import make_trace, wait_idle


def bench(trace: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "muxserve.cli", "bench", "--trace", str(trace), "--out", str(out)]
    return subprocess.Popen(
        [*cmd, "--no-progress", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_bench_writes_results_and_plots(server: str, tmp_path: Path) -> None:
    trace = make_trace(*((0.02 * i, ("llama-demo", "qwen-demo")[i % 2], 4) for i in range(6)))
    write_trace(tmp_path / "t.jsonl", trace.entries, trace.meta)
    out = tmp_path / "out"
    args = ("--url", server, "--ignore-eos", "--rates", "20", "40", "--slo", "ttft:60000")
    proc = bench(tmp_path / "t.jsonl", out, *args)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log
    results = json.loads((out / "results.json").read_text())
    assert [r["rate"] for r in results["runs"]] == [20.0, 40.0] and not results["interrupted"]
    for run in results["runs"]:
        assert run["summary"]["overall"]["completed"] == 6 == len(run["requests"])
        assert run["summary"]["overall"]["output_tokens"] == 24
        assert run["summary"]["overall"]["slo_attainment"] == 1.0
    assert (out / "latency_cdf.png").stat().st_size > 10_000
    assert (out / "slo_attainment.png").stat().st_size > 10_000
    assert "llama-demo" in log and "TTFT p99" in log


def test_sigint_writes_partial_results(
    server: str, live: tuple[str, MuxEngine], tmp_path: Path
) -> None:
    _, engine = live
    long = [(0.0, "mistral-demo", 900), (0.1, "llama-demo", 900)]
    trace = make_trace(*long, (20.0, "qwen-demo", 2))
    write_trace(tmp_path / "t.jsonl", trace.entries, trace.meta)
    out = tmp_path / "out"
    proc = bench(tmp_path / "t.jsonl", out, "--url", server, "--ignore-eos", "--no-plots")
    deadline = time.monotonic() + 30
    while sum(s.running for s in engine.stats().values()) < 2:  # both long ones under way
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, log
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert results["interrupted"] and run["stopped"] == "interrupted"
    assert (run["sent"], run["trace_requests"]) == (2, 3)
    assert [r["error"] for r in run["requests"]] == ["cancelled: interrupted"] * 2
    assert run["summary"]["overall"]["failed"] == 2
    wait_idle(engine)  # the cancelled streams were aborted on the server


def test_bad_trace_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("not json\n")
    proc = bench(tmp_path / "t.jsonl", tmp_path / "out")
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "t.jsonl:1" in log
    proc = bench(tmp_path / "missing.jsonl", tmp_path / "out")
    assert proc.wait(timeout=30) == 2
