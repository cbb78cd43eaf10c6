"""`muxserve bench`: replay a trace against an OpenAI-compatible endpoint and measure it.

    muxserve bench --trace trace.jsonl [--url http://127.0.0.1:8000] [--rates 2 4 8]
                   [--slo ttft:500 tpot:100] [--max-requests N] [--max-duration S]
                   [--out bench-results]

One request is sent first: if it fails (a wrong URL, model or key), nothing else is and the
command exits 1 with the server's answer. Writes `results.json` (after every run, so an
interrupted sweep keeps what it measured), `latency_cdf.png` (the last run, per model) and
`slo_attainment.png` (per model, against rate); each plot names its rate, SLO and workload
(without matplotlib the plots are skipped, with one line saying how to get them). Exits 1 if
every request of a run failed; Ctrl-C stops the current run, writes the partial results and
exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from muxserve.bench.client import PATHS, ClientOptions, RunResult, request_body, run_replay
from muxserve.bench.metrics import SLO, run_to_json
from muxserve.bench.plots import MissingPlotsError
from muxserve.bench.probe import probe_endpoint
from muxserve.bench.report import format_run, machine, write_json
from muxserve.bench.trace import read_trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="JSONL trace (scripts/gen_workload.py)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MUXSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $MUXSERVE_API_KEY or $OPENAI_API_KEY)",
    )
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        help="replay at each mean rate (req/s), the trace scaled in time; default: as recorded",
    )
    p.add_argument("--max-requests", type=int, help="send only the first N requests")
    p.add_argument(
        "--max-duration", type=float, help="seconds per run; open requests are cancelled"
    )
    p.add_argument("--max-concurrency", type=int, help="at most N requests open at once")
    p.add_argument(
        "--slo",
        "--goodput",
        nargs="+",
        default=[],
        metavar="KEY:MS",
        help="latency objectives for goodput and SLO attainment: ttft:MS tpot:MS e2el:MS",
    )
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", default="bench-results", help="folder for results.json and plots")
    p.add_argument("--label", default="bench", help="name of this benchmark in the results")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-requests", action="store_true", help="leave per-request records out")
    p.add_argument(
        "--sample-metrics",
        nargs="+",
        default=[],
        metavar="NAME",
        help="Prometheus gauges to sample from /metrics every 0.1 s "
        "(e.g. muxserve_kv_blocks_used muxserve:num_requests_waiting)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        slo = SLO.parse(args.slo)
        trace = read_trace(args.trace).head(args.max_requests)
    except (OSError, ValueError) as e:
        print(f"muxserve bench: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results: dict[str, Any] = {
        "label": args.label,
        "url": args.url,
        "endpoint": args.endpoint,
        "trace": str(args.trace),
        "trace_meta": trace.meta,
        "machine": machine(),
        "runs": [],
        "interrupted": False,
    }
    opts = ClientOptions(
        url=args.url,
        endpoint=args.endpoint,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        max_duration_s=args.max_duration,
        max_concurrency=args.max_concurrency,
        progress=not args.no_progress,
        label=args.label,
        sample_metrics=tuple(args.sample_metrics),
    )
    first = trace.entries[0] if trace.entries else None
    if first is not None:  # one request first: a wrong URL, model or key fails here, once
        body = {**request_body(first, opts), "max_tokens": 1, "stream": False}
        body.pop("stream_options", None)
        problem = asyncio.run(probe_endpoint(args.url, PATHS[args.endpoint], body, args.api_key))
        if problem is not None:
            print(
                f"muxserve bench: error: the probe request ({first.model} at "
                f"{args.url}{PATHS[args.endpoint]}) failed: {problem}",
                file=sys.stderr,
            )
            return 1
    last: RunResult | None = None
    failed_runs = 0
    for rate in args.rates or [None]:
        replayed = trace if rate is None else trace.at_rate(rate)
        last = run_replay(replayed, opts)
        run_json = run_to_json(last, slo, rate=rate, requests=not args.no_requests)
        results["runs"].append(run_json)
        results["interrupted"] = last.stopped == "interrupted"
        write_json(out / "results.json", results)
        print(format_run(run_json))
        if run_json["sent"] and not run_json["summary"]["overall"]["completed"]:
            failed_runs += 1
        if results["interrupted"]:
            break
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    if not args.no_plots and last is not None:
        try:
            plot(results, last, trace.models(), out)
        except MissingPlotsError:
            print(
                "plots skipped: they need matplotlib (pip install 'muxserve[plot]')",
                file=sys.stderr,
            )
    if results["interrupted"]:
        return 130
    if failed_runs:
        print(
            f"muxserve bench: error: every request failed in {failed_runs} of "
            f"{len(results['runs'])} runs; see 'errors' in {out / 'results.json'}",
            file=sys.stderr,
        )
        return 1
    return 0


def plot(results: dict[str, Any], last: RunResult, models: list[str], out: Path) -> None:
    """latency_cdf.png of the last run and, with SLOs, slo_attainment.png against rate."""
    from muxserve.bench.plots import plot_latency_cdfs, plot_vs_rate

    per_model = {m: [r for r in last.records if r.model == m] for m in models}
    rate = results["runs"][-1]["rate"]
    what = describe(results)
    title = (
        f"{results['label']}: latency CDFs "
        + ("at the trace's own rate" if rate is None else f"at {rate:g} req/s")
        + f"\n{what}"
    )
    plot_latency_cdfs(
        {"per model": {**per_model, "all": last.records}}, out / "latency_cdf.png", title
    )
    runs = [r for r in results["runs"] if r["rate"] is not None]
    if runs and runs[0]["slo"]:
        names = [*models, "all"]

        def series(key: str, sub: str | None = None) -> dict[str, list[tuple[float, Any]]]:
            def get(s: dict[str, Any], m: str) -> Any:
                g = s["overall"] if m == "all" else s["models"].get(m)
                v = None if g is None else g[key]
                return v if sub is None or v is None else v[sub]

            return {m: [(r["rate"], get(r["summary"], m)) for r in runs] for m in names}

        panels = {
            "SLO attainment": series("slo_attainment"),
            "p99 TTFT (ms)": series("ttft_ms", "p99"),
            "output tokens/s": series("output_throughput"),
        }
        plot_vs_rate(
            panels,
            out / "slo_attainment.png",
            f"{results['label']}: against rate\n{what}",
            ["p99 TTFT (ms)"],
        )


def describe(results: dict[str, Any]) -> str:
    """One line naming the workload and the SLO a plot shows."""
    slo = results["runs"][-1]["slo"] if results["runs"] else {}
    objective = ", ".join(f"{k.removesuffix('_ms')} <= {v:g} ms" for k, v in slo.items())
    meta = results.get("trace_meta") or {}
    keys = ("rate", "alpha", "cv", "ramp", "duration_s")
    shape = ", ".join(f"{k.removesuffix('_s')} {meta[k]}" for k in keys if k in meta)
    trace = Path(results["trace"]).name + (f" ({shape})" if shape else "")
    return f"workload {trace}; SLO {objective or 'none'}"
