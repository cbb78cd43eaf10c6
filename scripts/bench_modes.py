"""MuxServe against its two baselines, on one trace, in one command.

    python scripts/bench_modes.py [--rates 4 8 12 16] [--kv-pool-mib 1.25] [--trace FILE]
                                  [--slo ttft:250 tpot:50] [--out benchmarks/results/modes]

Three configurations of our own server, the same demo models and the same total KV bytes:

- mux:      one KV pool with adaptive quotas (ADBS), jobs of all models admitted together
            (each (model, phase) an SM share of 1/n);
- spatial:  the pool split statically and equally, each model on its own 1/n of the device;
- temporal: one shared pool, one job at a time, oldest request first (FCFS).

The three servers run side by side (an idle one costs nothing); the trace (generated unless
--trace is given) is replayed at each rate, scaled in time, against each mode in turn, with
the client of `muxserve bench`. The script prints throughput, p99 TTFT and SLO attainment per
mode and rate, and the ratios, and writes results.json, modes.png (against rate) and
modes_cdf.png (latency CDFs at the highest rate spatial sustains) to --out.

On a CPU the inline executor runs one job after another, so only the KV half of
multiplexing can show here; see docs/benchmarks.md for what the default workload exercises.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from muxserve.bench.client import ClientOptions, RunResult, run_replay
from muxserve.bench.metrics import SLO, run_to_json, tpot
from muxserve.bench.probe import peak_and_mean
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
SUSTAINED = 0.9  # share of requests meeting the SLOs, or of the offered rate, to sustain a rate
MESH = "local"  # the series label of a server's one engine (its configs have no plan)
GAUGES = ("muxserve_kv_blocks_used", "muxserve_kv_blocks_total", "muxserve:num_requests_waiting")


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
        },
    }


def warm_up(url: str, models: list[str]) -> None:
    """One short request per model, unmeasured: first calls pay for lazy initialisation."""
    entries = tuple(TraceEntry(0.05 * i, m, "warm up " * 8, 16, 8) for i, m in enumerate(models))
    run_replay(Trace(entries, {}), ClientOptions(url=url, ignore_eos=True, progress=False))


def serve_all(
    configs: dict[str, dict[str, Any]], tmp: Path, stack: ExitStack, models: list[str]
) -> dict[str, str]:
    """Start one server per mode (they idle at no cost while another is measured); URLs."""
    urls = {}
    for mode, config in configs.items():
        path = tmp / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(config))
        log_path = tmp / f"{mode}.log"
        log = stack.enter_context(log_path.open("w"))
        try:
            urls[mode] = stack.enter_context(ServerProcess(path, log=log))
        except RuntimeError:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise
        warm_up(urls[mode], models)
    return urls


def sweep(
    urls: dict[str, str], trace: Trace, args: argparse.Namespace
) -> dict[str, list[tuple[float, RunResult]]]:
    """Every rate, every mode; the order of the modes rotates from rate to rate, so a change
    in the machine's background load does not always land on the same mode."""
    runs: dict[str, list[tuple[float, RunResult]]] = {m: [] for m in urls}
    modes = list(urls)
    for i, rate in enumerate(args.rates):
        scaled = trace.at_rate(rate)
        limit = scaled.duration_s * args.time_limit_factor + 10.0
        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
            opts = ClientOptions(
                url=urls[mode],
                ignore_eos=True,
                max_duration_s=limit,
                progress=not args.no_progress,
                label=f"{mode} @{rate:g}",
                sample_metrics=GAUGES,
            )
            result = run_replay(scaled, opts)
            runs[mode].append((rate, result))
            if result.stopped == "interrupted":
                return runs
            time.sleep(0.5)  # cancelled requests' aborts land before the next run starts
    return runs


def kv_use(run: RunResult, models: list[str]) -> dict[str, dict[str, float]]:
    """Per model, from the server's gauges: the largest share of the pool it held, and how
    many of its requests waited for admission on average."""
    total = peak_and_mean(run.samples, f'muxserve_kv_blocks_total{{mesh="{MESH}"}}')
    out = {}
    for m in models:
        used = peak_and_mean(run.samples, f'muxserve_kv_blocks_used{{model="{m}",mesh="{MESH}"}}')
        waiting = peak_and_mean(
            run.samples, f'muxserve:num_requests_waiting{{model_name="{m}",mesh="{MESH}"}}'
        )
        if used and total and waiting:
            out[m] = {"peak_pool_share": used[0] / total[0], "mean_waiting": waiting[1]}
    return out


def meets_slo(run: dict[str, Any]) -> bool:
    """At least SUSTAINED of the requests met every SLO."""
    att = run["summary"]["overall"]["slo_attainment"]
    return att is not None and att >= SUSTAINED


def keeps_up(run: dict[str, Any]) -> bool:
    """Every request completed, at a request rate of at least SUSTAINED x the offered one."""
    o = run["summary"]["overall"]
    return o["failed"] == 0 and o["request_throughput"] >= SUSTAINED * run["rate"]


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    cols = [("rate", 6), ("mode", 10), ("req/s", 7), ("tok/s", 7), ("p50 TTFT", 10)]
    cols += [("p99 TTFT", 10), ("p99 TPOT", 10), ("SLO att", 9), ("goodput", 9)]
    cols += [("keeps up", 9), ("hot KV", 8), ("waiting", 8)]
    rows = []
    for rate in sorted({r["rate"] for runs in results.values() for r in runs}):
        for mode, runs in results.items():
            for r in (x for x in runs if x["rate"] == rate):
                o = r["summary"]["overall"]
                att, good, kv = o["slo_attainment"], o["goodput"], r["kv"].values()
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
                        "yes" if keeps_up(r) else "no",
                        f"{max((k['peak_pool_share'] for k in kv), default=0):.0%}",
                        f"{sum(k['mean_waiting'] for k in kv):.1f}",
                    ]
                )
    return format_table(rows, cols)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def ratios(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate: baseline p99 TTFT / mux p99 TTFT, mux tokens/s / baseline tokens/s."""
    out = []
    for r in results.get("mux", []):
        rate, m = r["rate"], r["summary"]["overall"]
        row: dict[str, Any] = {"rate": rate}
        for base in ("spatial", "temporal"):
            b = next((x for x in results.get(base, []) if x["rate"] == rate), None)
            if b is None:
                continue
            bo = b["summary"]["overall"]
            mt, bt = m["ttft_ms"]["p99"], bo["ttft_ms"]["p99"]
            row[f"p99_ttft_{base}_over_mux"] = None if not mt or bt is None else bt / mt
            row[f"tokens_mux_over_{base}"] = m["output_throughput"] / max(
                bo["output_throughput"], 1e-9
            )
        out.append(row)
    return out


def compare_rates(results: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """The highest rate spatial sustains, by SLO attainment and by throughput."""
    spatial = results.get("spatial", [])
    slo = [r["rate"] for r in spatial if meets_slo(r)]
    thr = [r["rate"] for r in spatial if keeps_up(r)]
    return {"slo": max(slo, default=None), "throughput": max(thr, default=None)}


def compact(run: RunResult) -> list[list[Any]]:
    """Per request: model, TTFT, TPOT, E2E (ms, None where missing), error or None."""

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
        rate=10.0,
        duration=12.0,
        alpha=0.5,
        arrival="gamma",
        cv=2.0,
        ramp="staggered",
        ramp_floor=0.05,
        ramp_width=0.5,
        ramp_cycles=2,
        prompt_len="chat:32:96",
        output_len="uniform:32:64",
        seed=0,
    )
    p.add_argument("--trace", help="replay this trace instead of generating one")
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 12.0, 16.0])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--kv-pool-mib", type=float, default=1.25, help="total KV bytes, every mode")
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
    configs = {mode: mode_config(mode, models, args) for mode in args.modes}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        urls = serve_all(configs, Path(tmp), stack, trace.models())
        runs = sweep(urls, trace, args)
    interrupted = any(r.stopped == "interrupted" for rs in runs.values() for _, r in rs)
    names = trace.models()
    results = {
        mode: [
            {**run_to_json(r, slo, rate=rate, requests=False), "kv": kv_use(r, names)}
            for rate, r in rs
        ]
        for mode, rs in runs.items()
    }
    compare = compare_rates(results)
    at = compare["throughput"] or compare["slo"] or min(args.rates)
    for mode, rs in runs.items():  # per-request latencies of the runs the CDFs show
        for row, (rate, r) in zip(results[mode], rs, strict=True):
            if rate == at:
                row["latencies"] = compact(r)
    summary = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
        "workload": trace.meta,
        "trace_requests": len(trace.entries),
        "slo": slo.to_json(),
        "configs": configs,
        "spatial_sustains_up_to": compare,
        "ratios": ratios(results),
        "interrupted": interrupted,
        "results": results,
    }
    write_json(out / "results.json", summary)
    print(f"\n{table(results)}\n")
    print("hot KV: the largest share of the pool one model held; waiting: mean queued requests")
    print("ratios: p99 TTFT baseline / mux, output tokens/s mux / baseline")
    for row in summary["ratios"]:
        cells = [f"{k}={v:.2f}" for k, v in row.items() if k != "rate" and isinstance(v, float)]
        print(f"  rate {row['rate']:g}: " + "  ".join(cells))
    for how, rate in compare.items():
        where = "none of the rates" if rate is None else f"{rate:g} req/s"
        print(f"highest rate spatial sustains by {how} (>= {SUSTAINED:.0%}): {where}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average: {load_start[0]:.2f} at the start; {load} at the end")
    if results:
        title = f"KV {args.kv_pool_mib:g} MiB, {len(trace.entries)} requests"
        plot(names, results, runs, at, out, title)
    print(f"wrote {out}/results.json, modes.png, modes_cdf.png", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
