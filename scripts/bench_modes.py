"""MuxServe against its two baselines, on one trace, in one command.

    python scripts/bench_modes.py [--rates 4 8 12 16] [--kv-pool-mib 2.25] [--trace FILE]
                                  [--slo ttft:250 tpot:50] [--out benchmarks/results/modes]

Three configurations of our own server, the same demo models and the same total KV bytes:

- mux:      one KV pool with adaptive quotas (ADBS), jobs of all models admitted together
            (each (model, phase) an SM share of 1/n);
- spatial:  the pool split statically and equally, each model on its own 1/n of the device;
- temporal: one shared pool, one job at a time, oldest request first (FCFS).

The trace (generated unless --trace is given) is replayed at each rate, scaled in time, with
the client of `muxserve bench`; the script prints throughput, p99 TTFT and SLO attainment
per mode and rate, and the ratios, and writes results.json and PNG plots to --out.

On a CPU the inline executor runs one job after another, so only the KV half of
multiplexing can show here; see docs/benchmarks.md for what the default workload exercises.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from muxserve.bench.client import ClientOptions, RunResult, run_replay
from muxserve.bench.metrics import SLO, run_to_json
from muxserve.bench.report import format_table, machine, write_json
from muxserve.bench.server import ServerProcess
from muxserve.bench.trace import Trace, TraceEntry, read_trace, write_trace
from muxserve.bench.workload import add_workload_arguments, generate, load_tokenizer, spec_from_args

# mode -> (policy, kv_mode, SM share per (model, phase): None means 1/number of models)
MODES: dict[str, tuple[str, str, float | None]] = {
    "mux": ("adbs", "unified", None),
    "spatial": ("adbs", "static", None),
    "temporal": ("fcfs", "unified", 1.0),
}
SUSTAINED = 0.9  # a mode sustains a rate if it completes this share of the offered rate


def mode_config(mode: str, models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """The serving config of one mode: every mode gets the same models and KV bytes."""
    policy, kv_mode, share = MODES[mode]
    share = share if share is not None else round(1.0 / len(models), 4)
    return {
        "models": [
            {
                "name": name,
                "path": str(path),
                "rate": 1.0,  # no prior: ADBS starts from KV bytes per token and adapts
                "sm_share": {"prefill": share, "decode": share},
            }
            for name, path in models.items()
        ],
        "engine": {
            "kv_pool_bytes": int(args.kv_pool_mib * 2**20),
            "block_bytes": args.block_bytes,
            "policy": policy,
            "kv_mode": kv_mode,
            "prefill_token_budget": 512,
            "max_batch_size": 32,
            "device": "cpu",
        },
    }


def warm_up(url: str, models: list[str], opts: ClientOptions) -> None:
    """One short request per model, unmeasured: first calls pay for lazy initialisation."""
    entries = tuple(TraceEntry(0.05 * i, m, "warm up " * 8, 16, 8) for i, m in enumerate(models))
    run_replay(Trace(entries, {}), ClientOptions(url=url, ignore_eos=True, progress=False))


def run_mode(
    mode: str, config: Path, trace: Trace, args: argparse.Namespace, log: Any
) -> list[tuple[float, RunResult]]:
    """Start the mode's server, replay the trace at every rate, stop the server."""
    runs = []
    with ServerProcess(config, log=log) as url:
        opts = ClientOptions(
            url=url,
            ignore_eos=True,
            progress=not args.no_progress,
            label=mode,
            max_duration_s=None,
        )
        warm_up(url, trace.models(), opts)
        for rate in args.rates:
            scaled = trace.at_rate(rate)
            limit = scaled.duration_s * args.time_limit_factor + 10.0
            run_opts = replace(opts, max_duration_s=limit, label=f"{mode} @{rate:g}")
            result = run_replay(scaled, run_opts)
            runs.append((rate, result))
            if result.stopped == "interrupted":
                break
            time.sleep(0.5)  # cancelled requests' aborts land before the next rate starts
    return runs


def sustains(run: dict[str, Any]) -> bool:
    """Whether a run kept up: all requests completed at >= SUSTAINED x the offered rate."""
    o = run["summary"]["overall"]
    return o["failed"] == 0 and o["request_throughput"] >= SUSTAINED * run["rate"]


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    cols = [("rate", 6), ("mode", 10), ("req/s", 8), ("tok/s", 8), ("p50 TTFT", 10)]
    cols += [("p99 TTFT", 10), ("p99 TPOT", 10), ("SLO att", 9), ("goodput", 9), ("kept up", 8)]
    rows = []
    rates = sorted({r["rate"] for runs in results.values() for r in runs})
    for rate in rates:
        for mode, runs in results.items():
            for r in (x for x in runs if x["rate"] == rate):
                o = r["summary"]["overall"]
                att, good = o["slo_attainment"], o["goodput"]
                rows.append(
                    [
                        f"{rate:g}",
                        mode,
                        f"{o['request_throughput']:.2f}",
                        f"{o['output_throughput']:.0f}",
                        _ms(o["ttft_ms"]["p50"]),
                        _ms(o["ttft_ms"]["p99"]),
                        _ms(o["tpot_ms"]["p99"]),
                        "-" if att is None else f"{att:.1%}",
                        "-" if good is None else f"{good:.2f}",
                        "yes" if sustains(r) else "no",
                    ]
                )
    return format_table(rows, cols)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def ratios(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate: baseline p99 TTFT / mux p99 TTFT, mux throughput / baseline throughput."""
    out = []
    mux = {r["rate"]: r["summary"]["overall"] for r in results.get("mux", [])}
    for rate, m in sorted(mux.items()):
        row: dict[str, Any] = {"rate": rate}
        for base in ("spatial", "temporal"):
            b = next(
                (r["summary"]["overall"] for r in results.get(base, []) if r["rate"] == rate), None
            )
            if b is None:
                continue
            mt, bt = m["ttft_ms"]["p99"], b["ttft_ms"]["p99"]
            row[f"p99_ttft_{base}_over_mux"] = None if not mt or bt is None else bt / mt
            row[f"tokens_mux_over_{base}"] = m["output_throughput"] / max(
                b["output_throughput"], 1e-9
            )
            row[f"slo_att_{base}"] = b["slo_attainment"]
        row["slo_att_mux"] = m["slo_attainment"]
        out.append(row)
    return out


def compact(run: RunResult) -> list[list[Any]]:
    """Per request: model, TTFT, TPOT, E2E (ms, None where missing), error or None."""
    from muxserve.bench.metrics import tpot

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 2)

    return [[r.model, ms(r.ttft), ms(tpot(r)), ms(r.latency), r.error] for r in run.records]


def make_trace(args: argparse.Namespace, models: dict[str, Path]) -> Trace:
    if args.trace:
        return read_trace(args.trace)
    spec = spec_from_args(args, list(models))
    tokenizer = load_tokenizer(args.tokenizer or models[spec.models[0]])
    entries, meta = generate(spec, tokenizer)
    path = Path(args.out) / "trace.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_trace(path, entries, meta)
    return read_trace(path)


def plot(
    models: list[str],
    results: dict[str, list[dict[str, Any]]],
    runs: dict[str, list[tuple[float, RunResult]]],
    rate: float,
    out: Path,
    title: str,
) -> None:
    from muxserve.bench.plots import plot_latency_cdfs, plot_vs_rate

    def series(get: Any) -> dict[str, list[tuple[float, Any]]]:
        return {
            m: [(r["rate"], get(r["summary"]["overall"])) for r in rs] for m, rs in results.items()
        }

    panels = {
        "SLO attainment": series(lambda o: o["slo_attainment"]),
        "p99 TTFT (ms)": series(lambda o: o["ttft_ms"]["p99"]),
        "output tokens/s": series(lambda o: o["output_throughput"]),
    }
    plot_vs_rate(panels, out / "modes.png", title, log_panels=["p99 TTFT (ms)"])
    at = {m: next((r for x, r in rs if x == rate), None) for m, rs in runs.items()}
    chosen = {m: r.records for m, r in at.items() if r is not None}
    rows = {
        m: {mode: [x for x in recs if x.model == m] for mode, recs in chosen.items()}
        for m in models
    }
    rows["all"] = chosen
    plot_latency_cdfs(rows, out / "modes_cdf.png", f"latency CDFs at {rate:g} req/s ({title})")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(
        p,
        rate=6.0,
        duration=30.0,
        alpha=0.5,
        arrival="gamma",
        cv=2.0,
        ramp="staggered",
        ramp_floor=0.05,
        ramp_width=0.5,
        ramp_cycles=2,
        prompt_len="chat:48:128",
        output_len="uniform:64:128",
        seed=0,
    )
    p.add_argument("--trace", help="replay this trace instead of generating one")
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 12.0, 16.0])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--kv-pool-mib", type=float, default=2.25, help="total KV bytes, every mode")
    p.add_argument("--block-bytes", type=int, default=4096)
    p.add_argument("--slo", nargs="+", default=["ttft:250", "tpot:50"], metavar="KEY:MS")
    p.add_argument(
        "--time-limit-factor", type=float, default=3.0, help="run limit: factor x trace span + 10s"
    )
    p.add_argument("--out", default="benchmarks/results/modes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    from muxserve.demo import ensure_demo_models

    models = ensure_demo_models(progress=True)
    slo = SLO.parse(args.slo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = make_trace(args, models)
    load_start = os.getloadavg()
    print(
        f"{len(trace.entries)} requests over {trace.duration_s:g}s "
        f"({trace.rate:.2f} req/s as generated); load average {load_start[0]:.2f}",
        file=sys.stderr,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[tuple[float, RunResult]]] = {}
    configs = {}
    interrupted = False
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            configs[mode] = mode_config(mode, models, args)
            path = Path(tmp) / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(configs[mode]))
            log_path = Path(tmp) / f"{mode}.log"
            with open(log_path, "w") as log:
                try:
                    runs[mode] = run_mode(mode, path, trace, args, log)
                except RuntimeError:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    raise
            results[mode] = [
                {**run_to_json(r, slo, rate=rate, requests=False), "latencies": compact(r)}
                for rate, r in runs[mode]
            ]
            if any(r.stopped == "interrupted" for _, r in runs[mode]):
                interrupted = True
                break
    kept = [r["rate"] for r in results.get("spatial", []) if sustains(r)]
    compare = max(kept) if kept else min(args.rates)
    summary = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
        "workload": trace.meta,
        "trace_requests": len(trace.entries),
        "slo": slo.to_json(),
        "configs": configs,
        "compare_rate": compare,
        "ratios": ratios(results),
        "interrupted": interrupted,
        "results": results,
    }
    write_json(out / "results.json", summary)
    print()
    print(table(results))
    print("\nratios (p99 TTFT: baseline / mux; tokens/s: mux / baseline)")
    print(f"spatial kept up with the offered rate up to {compare:g} req/s")
    for row in summary["ratios"]:
        cells = [f"{k}={v:.2f}" for k, v in row.items() if k != "rate" and isinstance(v, float)]
        print(f"  rate {row['rate']:g}: " + "  ".join(cells))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end: {load}")
    if results:
        title = f"KV {args.kv_pool_mib:g} MiB, {len(trace.entries)} requests"
        plot(trace.models(), results, runs, compare, out, title)
    print(f"wrote {out}/results.json, modes.png, modes_cdf.png", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
