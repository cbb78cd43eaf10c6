"""`muxserve bench` as a real process: results and plots on disk; Ctrl-C keeps partial results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from muxserve.bench.cli import describe
from muxserve.bench.trace import write_trace
from muxserve.engine import MuxEngine
from tests.bench.conftest import make_trace
from tests.helpers.server import wait_idle


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


def test_a_failing_probe_stops_the_benchmark_at_once(server: str, tmp_path: Path) -> None:
    trace = make_trace((0.0, "no-such-model", 4), (0.1, "llama-demo", 4))
    write_trace(tmp_path / "t.jsonl", trace.entries, trace.meta)
    proc = bench(tmp_path / "t.jsonl", tmp_path / "out", "--url", server)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, log
    assert "the probe request (no-such-model at" in log and "HTTP 404" in log
    assert "model_not_found" in log
    assert not (tmp_path / "out" / "results.json").exists()  # nothing else was sent
    proc = bench(tmp_path / "t.jsonl", tmp_path / "out", "--url", "http://127.0.0.1:9")
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "ClientConnectorError" in log, log


def test_a_run_where_every_request_failed_exits_1(server: str, tmp_path: Path) -> None:
    # the probe asks for 1 token and passes; each request then asks for more than the context
    trace = make_trace((0.0, "llama-demo", 100_000), (0.05, "qwen-demo", 100_000))
    write_trace(tmp_path / "t.jsonl", trace.entries, trace.meta)
    proc = bench(tmp_path / "t.jsonl", tmp_path / "out", "--url", server, "--no-plots")
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, log
    assert "every request failed in 1 of 1 runs" in log
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["runs"][0]["summary"]["overall"]["failed"] == 2


def test_without_matplotlib_the_plots_are_skipped_with_one_line(
    server: str, tmp_path: Path
) -> None:
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    trace = make_trace((0.0, "llama-demo", 2))
    write_trace(tmp_path / "t.jsonl", trace.entries, trace.meta)
    cmd = [sys.executable, "-m", "muxserve.cli", "bench", "--trace", str(tmp_path / "t.jsonl")]
    cmd += ["--out", str(tmp_path / "out"), "--url", server, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hide'}{os.pathsep}{Path.cwd()}"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    assert "plots skipped: they need matplotlib (pip install 'muxserve[plot]')" in run.stderr
    assert not list((tmp_path / "out").glob("*.png"))


def test_each_plot_names_its_workload_and_slo() -> None:
    results = {
        "trace": "/x/trace.jsonl",
        "trace_meta": {"rate": 6.0, "alpha": 1.0, "cv": 2.0, "ramp": "staggered", "duration_s": 60},
        "runs": [{"slo": {"ttft_ms": 250.0, "tpot_ms": 50.0}}],
    }
    assert describe(results) == (
        "workload trace.jsonl (rate 6.0, alpha 1.0, cv 2.0, ramp staggered, duration 60); "
        "SLO ttft <= 250 ms, tpot <= 50 ms"
    )


def test_help_shows_defaults_and_the_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "muxserve.cli", "bench", "--help"], capture_output=True, text=True
    )
    text = " ".join(run.stdout.split())
    assert "base URL of the server (default: http://127.0.0.1:8000)" in text
    assert "(default: [])" not in text and "(default: None)" not in text
    run = subprocess.run(
        [sys.executable, "-m", "muxserve.cli", "generate", "--model", "nope"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "model 'nope' is not served here; served models: llama-demo" in run.stderr
    assert "loading models" not in run.stderr  # the name is checked before anything loads


def test_gen_workload_names_a_missing_tokenizer(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "scripts/gen_workload.py", "--tokenizer", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert f"--tokenizer {tmp_path / 'nope'}: no such file or folder" in run.stderr
