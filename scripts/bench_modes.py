"""MuxServe against its two baselines, on one trace, in one command.

    python scripts/bench_modes.py [--rates 4 8 12 16] [--repeats 3] [--kv-pool-mib 1.25]
                                  [--trace FILE] [--slo ttft:250 tpot:50]
                                  [--out benchmarks/results/modes]

Three configurations of our own server, the same demo models and the same total KV bytes:

- mux:      one KV pool with adaptive quotas (ADBS), jobs of all models admitted together
            (each (model, phase) an SM share of 1/n);
- spatial:  the pool split statically and equally, each model on its own 1/n of the device;
- temporal: one shared pool, one job at a time, oldest request first (FCFS).

One server runs at a time: for each of `--repeats` repeats, each mode in turn (the order
rotating from repeat to repeat) starts its server, replays the trace (generated unless --trace
is given) at every rate, scaled in time, with the client of `muxserve bench`, and stops. Every
point is thus measured --repeats times, far apart in time, and reported as the median with the
min and max over the repeats; a ratio of two modes is taken per repeat (their runs are minutes
apart at most) and reported likewise. A claim ("mux's p99 TTFT is lower than spatial's") is
printed only for the rates where it holds in every repeat. results.json, modes.png (medians
against rate) and modes_cdf.png (latency CDFs of the first repeat at the highest rate spatial
sustains) go to --out.

On a CPU the inline executor runs one job after another, so only the KV half of
multiplexing can show here; see docs/benchmarks.md for what the default workload exercises.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from muxserve.bench.client import ClientOptions, RunResult, run_replay
from muxserve.bench.metrics import SLO, run_to_json, tpot
from muxserve.bench.probe import parse_prometheus, peak_and_mean
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


def rotated(items: list[Any], k: int) -> list[Any]:
    return items[k % len(items) :] + items[: k % len(items)]


def sweep(
    configs: dict[str, dict[str, Any]],
    trace: Trace,
    args: argparse.Namespace,
    tmp: Path,
    models: list[str],
) -> dict[str, list[tuple[float, int, RunResult]]]:
    """Every repeat, every mode (one server at a time, the order rotating per repeat), every
    rate: (rate, repeat, run) per mode."""
    runs: dict[str, list[tuple[float, int, RunResult]]] = {m: [] for m in configs}
    for rep in range(args.repeats):
        for mode in rotated(list(configs), rep):
            path = tmp / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(configs[mode]))
            log_path = tmp / f"{mode}-{rep}.log"
            with log_path.open("w") as log:
                try:
                    server = ServerProcess(path, log=log)
                    url = server.start()
                except RuntimeError:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    raise
                try:
                    warm_up(url, models)
                    for rate in args.rates:
                        result = replay(url, trace, rate, f"{mode} @{rate:g} #{rep}", args)
                        runs[mode].append((rate, rep, result))
                        if result.stopped == "interrupted":
                            return runs
                finally:
                    server.stop()
    return runs


def replay(url: str, trace: Trace, rate: float, label: str, args: argparse.Namespace) -> RunResult:
    scaled = trace.at_rate(rate)
    opts = ClientOptions(
        url=url,
        ignore_eos=True,
        max_duration_s=scaled.duration_s * args.time_limit_factor + 10.0,
        progress=not args.no_progress,
        label=label,
        sample_metrics=GAUGES,
    )
    result = run_replay(scaled, opts)
    wait_drained(url)  # cancelled requests' aborts land before the next run starts
    return result


DRAIN_NAMES = ("muxserve:num_requests_running", "muxserve:num_requests_waiting")


def wait_drained(url: str, timeout_s: float = 60.0) -> None:
    """Poll the server's /metrics until no request runs or waits (a warning past the
    deadline: the next run then starts with the leftovers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
                values = parse_prometheus(resp.read().decode(), DRAIN_NAMES)
        except OSError:
            values = {"unreadable": 1.0}
        if not any(values.values()):
            return
        time.sleep(0.05)
    print(f"warning: {url} still has requests after {timeout_s:g} s", file=sys.stderr)


def find_series(run: RunResult, name: str, **labels: str) -> str:
    """The key under which `run`'s samples hold the series `name{labels}`, whatever the
    server's label order ('' if no sample has it)."""
    for _, values in run.samples:
        for key in values:
            head, _, rest = key.partition("{")
            if head == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
                return key
    return ""


def kv_use(run: RunResult, models: list[str]) -> dict[str, dict[str, float]]:
    """Per model, from the server's gauges: the largest share of the pool it held, and how
    many of its requests waited for admission on average."""
    total = peak_and_mean(run.samples, find_series(run, "muxserve_kv_blocks_total", mesh=MESH))
    out = {}
    for m in models:
        used_key = find_series(run, "muxserve_kv_blocks_used", model=m, mesh=MESH)
        waiting_key = find_series(run, "muxserve:num_requests_waiting", model_name=m, mesh=MESH)
        used = peak_and_mean(run.samples, used_key)
        waiting = peak_and_mean(run.samples, waiting_key)
        if used and total and waiting:
            out[m] = {"peak_pool_share": used[0] / total[0], "mean_waiting": waiting[1]}
    return out


Getter = Callable[[dict[str, Any]], float | None]


def spread(runs: list[dict[str, Any]], get: Getter) -> tuple[float, float, float] | None:
    """(median, min, max) of `get` over runs (the repeats of one point); None if none has it."""
    vals = [v for v in map(get, runs) if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def point(results: dict[str, list[dict[str, Any]]], mode: str, rate: float) -> list[dict]:
    """The repeats of one (mode, rate)."""
    return [r for r in results.get(mode, []) if r["rate"] == rate]


def rates_of(results: dict[str, list[dict[str, Any]]]) -> list[float]:
    return sorted({r["rate"] for runs in results.values() for r in runs})


def keeps_up(run: dict[str, Any]) -> bool:
    """Every request completed, at a request rate of at least SUSTAINED x the offered one."""
    o = run["summary"]["overall"]
    return o["failed"] == 0 and o["request_throughput"] >= SUSTAINED * run["rate"]


def ttft(q: str) -> Getter:
    return lambda r: r["summary"]["overall"]["ttft_ms"][q]


def overall(key: str) -> Getter:
    return lambda r: r["summary"]["overall"][key]


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Per rate and mode, the median over repeats, with (min-max) where it matters."""
    cols = [("rate", 6), ("mode", 10), ("req/s", 7), ("tok/s", 6), ("p50 TTFT", 10)]
    cols += [("p90 TTFT (min-max)", 21), ("p99 TTFT (min-max)", 21), ("p99 TPOT", 10)]
    cols += [("SLO att (min-max)", 24), ("keeps up", 9), ("hot KV", 7), ("waiting", 8)]
    rows = []
    for rate in rates_of(results):
        for mode in results:
            runs = point(results, mode, rate)
            if not runs:
                continue
            hot = spread(
                runs, lambda r: max((k["peak_pool_share"] for k in r["kv"].values()), default=0)
            )
            waiting = spread(runs, lambda r: sum(k["mean_waiting"] for k in r["kv"].values()))
            rows.append(
                [
                    f"{rate:g}",
                    mode,
                    _med(spread(runs, overall("request_throughput")), "{:.2f}"),
                    _med(spread(runs, overall("output_throughput")), "{:.0f}"),
                    _ms(_first(spread(runs, ttft("p50")))),
                    _range(spread(runs, ttft("p90")), _ms),
                    _range(spread(runs, ttft("p99")), _ms),
                    _ms(_first(spread(runs, lambda r: r["summary"]["overall"]["tpot_ms"]["p99"]))),
                    _range(spread(runs, overall("slo_attainment")), lambda x: f"{x:.1%}"),
                    f"{sum(map(keeps_up, runs))}/{len(runs)}",
                    _med(hot, "{:.0%}"),
                    _med(waiting, "{:.1f}"),
                ]
            )
    return format_table(rows, cols)


def _first(s: tuple[float, float, float] | None) -> float | None:
    return None if s is None else s[0]


def _med(s: tuple[float, float, float] | None, fmt: str) -> str:
    return "-" if s is None else fmt.format(s[0])


def _range(s: tuple[float, float, float] | None, fmt: Callable[[float], str]) -> str:
    return "-" if s is None else f"{fmt(s[0])} ({fmt(s[1])}-{fmt(s[2])})"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


RATIOS: dict[str, tuple[Getter, bool]] = {  # name -> (metric, whether lower is better)
    "p99_ttft": (ttft("p99"), True),
    "p90_ttft": (ttft("p90"), True),
    "tokens_per_s": (overall("output_throughput"), False),
}


def ratios(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate and baseline, per metric: baseline / mux for latencies, mux / baseline for
    throughput (above 1: mux better), taken per repeat; the median, min, max and each."""
    out = []
    for rate in rates_of(results):
        row: dict[str, Any] = {"rate": rate}
        mux = {r["repeat"]: r for r in point(results, "mux", rate)}
        for base in ("spatial", "temporal"):
            other = {r["repeat"]: r for r in point(results, base, rate)}
            for name, (get, lower_better) in RATIOS.items():
                each = []
                for rep in sorted(mux.keys() & other.keys()):
                    m, b = get(mux[rep]), get(other[rep])
                    if m and b:
                        each.append(b / m if lower_better else m / b)
                if each:
                    row[f"{name}_{base}_vs_mux"] = {
                        "median": statistics.median(each),
                        "min": min(each),
                        "max": max(each),
                        "per_repeat": each,
                    }
        out.append(row)
    return out


def claims(rows: list[dict[str, Any]]) -> list[str]:
    """What the repeats support: mux better (or worse) than a baseline in every repeat."""
    lines = []
    for row in rows:
        for key, r in row.items():
            if key == "rate":
                continue
            metric, base = key.removesuffix("_vs_mux").rsplit("_", 1)
            n = len(r["per_repeat"])
            what = f"rate {row['rate']:g}, {metric} vs {base}:"
            span = f"{r['median']:.2f}x (min {r['min']:.2f}x, max {r['max']:.2f}x, {n} repeats)"
            if r["min"] > 1.0:
                lines.append(f"{what} mux better in every repeat, {span}")
            elif r["max"] < 1.0:
                lines.append(f"{what} mux worse in every repeat, {span}")
            else:
                lines.append(f"{what} no claim, the repeats disagree: {span}")
    return lines


def compare_rates(results: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """The highest rate spatial sustains: by SLO attainment (the median over repeats) and by
    throughput (in most repeats)."""
    slo, thr = [], []
    for rate in rates_of(results):
        runs = point(results, "spatial", rate)
        att = spread(runs, overall("slo_attainment"))
        if att is not None and att[0] >= SUSTAINED:
            slo.append(rate)
        if runs and 2 * sum(map(keeps_up, runs)) > len(runs):
            thr.append(rate)
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
    runs: dict[str, list[tuple[float, int, RunResult]]],
    rate: float,
    out: Path,
    title: str,
) -> None:
    from muxserve.bench.plots import plot_latency_cdfs, plot_vs_rate

    def series(get: Getter) -> dict[str, list[tuple[float, Any]]]:
        """Per mode, (rate, the median over repeats)."""
        return {
            m: [(x, _first(spread(point(results, m, x), get))) for x in rates_of(results)]
            for m in results
        }

    panels = {
        "SLO attainment": series(overall("slo_attainment")),
        "p99 TTFT (ms)": series(ttft("p99")),
        "output tokens/s": series(overall("output_throughput")),
    }
    plot_vs_rate(panels, out / "modes.png", f"{title}, medians", log_panels=["p99 TTFT (ms)"])
    at = {
        m: next((r for x, rep, r in rs if x == rate and rep == 0), None) for m, rs in runs.items()
    }
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
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of every (mode, rate), far apart in time"
    )
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
    with tempfile.TemporaryDirectory() as tmp:
        runs = sweep(configs, trace, args, Path(tmp), trace.models())
    interrupted = any(r.stopped == "interrupted" for rs in runs.values() for _, _, r in rs)
    names = trace.models()
    results = {
        mode: [
            {
                **run_to_json(r, slo, rate=rate, requests=False),
                "repeat": rep,
                "kv": kv_use(r, names),
            }
            for rate, rep, r in rs
        ]
        for mode, rs in runs.items()
    }
    compare = compare_rates(results)
    at = compare["throughput"] or compare["slo"] or min(args.rates)
    for mode, rs in runs.items():  # per-request latencies of the runs the CDFs show
        for row, (rate, rep, r) in zip(results[mode], rs, strict=True):
            if rate == at and rep == 0:
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
        "repeats": args.repeats,
        "spatial_sustains_up_to": compare,
        "ratios": ratios(results),
        "interrupted": interrupted,
        "results": results,
    }
    summary["claims"] = claims(summary["ratios"])
    write_json(out / "results.json", summary)
    print(f"\n{table(results)}\n")
    print(f"medians over {args.repeats} repeats, (min-max) across them")
    print("hot KV: the largest share of the pool one model held; waiting: mean queued requests")
    print("ratios, per repeat (above 1: mux better): TTFT baseline / mux, tokens/s mux / baseline")
    for line in summary["claims"]:
        print(f"  {line}")
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
