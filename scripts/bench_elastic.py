"""Elastic multiplexing benchmark (issue 15): more models than memory, on CPU meshes.

    python scripts/bench_elastic.py [--copies 6] [--meshes 2] [--fit 2] [--rate 10]
        [--duration 30] [--repeats 3] [--traces shifting longtail]
        [--modes static sleep replan] [--slo-ttft-ms 2000] [--slo-tpot-ms 300]
        [--out benchmarks/results/elastic]

The models are --copies copies each of two demo checkpoints (llama-demo, qwen-demo) under
their own names (llama-demo-0, ...): 2 x copies models, each loaded on its own. --meshes CPU
meshes (`python -m muxserve.mesh` children of one `muxserve serve`), each with a weights budget
that holds --fit models at once: with the defaults 12 models where 4 fit, 3x more models than
memory. The models are split into contiguous blocks, one per mesh (their home).

Traces (scripts/gen_workload.py's modes, --rate req/s over --duration s, seeded per repeat):
- shifting: the power law's ranks rotate every phase (4 phases): which models are hot moves,
  and the hot ones are neighbours, so they crowd one mesh;
- longtail: Zipf (alpha 1, the classic law) over a seeded shuffle of the models: a few
  carry the load;
- crowd: the hot set moves onto one mesh. For the first --crowd-warm of the duration the
  --crowd-hot hot models are spread over the meshes (the first model of each mesh's block in
  turn), then they are the first --crowd-hot models of mesh-0's block: all on one mesh, the
  other idle. Every model fits its home mesh (the budget holds one model more than a mesh
  lists), so memory is not the limit: one mesh's CPU is.

Modes, each served by a fresh server:
- static: a plan that must leave models out: the --fit x --meshes models with the highest
  mean rate in the trace, round robin over the meshes, always awake; requests for the others
  fail (404: not served);
- sleep: every model on its home mesh, the --fit most popular awake at start, the rest asleep;
  the mesh's residency policy wakes a model on request and puts idle ones to sleep for room
  (level 2: the weights are dropped and reloaded from the checkpoint on wake);
- replan: as sleep, and every model also listed as standby on the other meshes; the router
  re-plans on the rates it measures and moves models between meshes (wake, switch, drain,
  sleep). Its cost model is a cluster file standing in for the CPU meshes (tiny GPUs whose
  capacity binds at these rates): the plan's numbers are not the CPU's, only its shape.
  On the crowd trace there are no standbys: `router.replan.add_models` lets the router add a
  model to the other mesh and remove it from the crowded one (meshes that change shape).
  On the crowd trace static and sleep are the same plan (every model on its home mesh, made
  for the first phase's rates); sleep/wake cannot help there, since each mesh holds what it
  lists.

Reported per trace and mode, median over --repeats with min and max: SLO attainment (a
request counts if it completed within both --slo-ttft-ms and --slo-tpot-ms; failed requests
count as misses), served throughput (completed requests/s), models served per mesh (awake at
some time: awake at start or woken), wake times p50/p99 (from the meshes' wake-time
histograms: bucket upper bounds), and models moved by re-planning. JSON and a PNG go to
--out, with the command and the load average. Not a test: the machine's other users move the
numbers; the load average says how busy it was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from muxserve.bench.client import ClientOptions, run_replay
from muxserve.bench.metrics import SLO, summarize
from muxserve.bench.report import machine, write_json
from muxserve.bench.server import ServerProcess
from muxserve.bench.trace import Trace, TraceEntry
from muxserve.bench.workload import LengthDist, WorkloadSpec, generate, load_tokenizer
from muxserve.config import dump_config, parse_config
from muxserve.demo import DEMO_ENGINE, ensure_demo_models

BASES = ("llama-demo", "qwen-demo")
MODES = ("static", "sleep", "replan")
TRACES = ("shifting", "longtail", "crowd")
# the re-planner's cost model: two tiny "GPUs" whose capacity binds at a few req/s of the demo
# models (tests/router/test_replan.py uses the same numbers)
STAND_IN_GPU = {"type": "A100-80GB", "memory_gib": 1024, "peak_tflops": 0.002, "hbm_gbps": 0.12}


def model_list(copies: int) -> list[tuple[str, Path]]:
    demo = ensure_demo_models()
    return [(f"{b}-{k}", demo[b]) for b in BASES for k in range(copies)]


def weight_bytes(path: Path) -> int:
    """What the engine counts against the budget for a model on a CPU (float32)."""
    from muxserve.models.hf_config import load_hf_config
    from muxserve.models.registry import checkpoint_shapes

    shapes = checkpoint_shapes(load_hf_config(path))
    return sum(math.prod(s) for s in shapes.values()) * 4


def homes(names: list[str], meshes: int) -> dict[str, int]:
    """Contiguous blocks of the model list, one per mesh."""
    per = math.ceil(len(names) / meshes)
    return {n: i // per for i, n in enumerate(names)}


def spec_for(trace: str, names: list[str], args: argparse.Namespace, seed: int) -> WorkloadSpec:
    common: dict[str, Any] = {
        "models": tuple(names),
        "rate": args.rate,
        "duration_s": args.duration,
        "prompt_len": LengthDist.parse("uniform:16:32"),
        "output_len": LengthDist.parse("uniform:8:16"),
        "seed": seed,
    }
    if trace == "shifting":
        return WorkloadSpec(**common, popularity="shifting", alpha=1.0, shift_phases=4)
    return WorkloadSpec(**common, popularity="longtail", alpha=1.2)


def crowd_sets(names: list[str], meshes: int, hot: int) -> tuple[list[str], list[str]]:
    """The crowd trace's hot models before (spread: each mesh's block in turn) and after the
    shift (the first `hot` of mesh-0's block)."""
    home = homes(names, meshes)
    blocks = [[n for n in names if home[n] == i] for i in range(meshes)]
    spread = [b[k] for k in range(max(len(b) for b in blocks)) for b in blocks if k < len(b)]
    if hot > len(blocks[0]):
        raise ValueError(f"--crowd-hot {hot}: mesh-0 holds only {len(blocks[0])} models")
    return spread[:hot], blocks[0][:hot]


def crowd_trace(
    names: list[str], args: argparse.Namespace, seed: int, tokenizer: Any
) -> tuple[list[TraceEntry], dict[str, Any], dict[str, float]]:
    """The crowd trace (see the module): entries, meta, and the first phase's rates (what the
    static plan was made for)."""
    before, after = crowd_sets(names, args.meshes, args.crowd_hot)
    warm = args.duration * args.crowd_warm
    lengths = {
        "prompt_len": LengthDist.parse(args.crowd_prompt),
        "output_len": LengthDist.parse(args.crowd_output),
    }
    first = WorkloadSpec(
        tuple(before),
        args.rate,
        warm,
        alpha=0.0,
        seed=seed,
        **lengths,
    )
    second = WorkloadSpec(
        tuple(after),
        args.rate,
        args.duration - warm,
        alpha=0.0,
        seed=seed + 1000,
        **lengths,
    )
    a, _ = generate(first, tokenizer)
    b, _ = generate(second, tokenizer)
    entries = a + [replace(e, arrival_s=round(e.arrival_s + warm, 6)) for e in b]
    planned = {n: args.rate / len(before) if n in before else 0.0 for n in names}
    meta = {
        "popularity": "crowd",
        "hot_before": before,
        "hot_after": after,
        "warm_s": warm,
        "rate": args.rate,
        "duration_s": args.duration,
        "requests": len(entries),
        "seed": seed,
    }
    return entries, meta, planned


def build_crowd_config(
    mode: str,
    models: list[tuple[str, Path]],
    rates: dict[str, float],
    args: argparse.Namespace,
    cluster: Path,
) -> dict[str, Any]:
    """Every model on its home mesh, awake; the budget holds one model more than a mesh
    lists (room for one moved in). static: no residency budget; replan: add_models."""
    names = [n for n, _ in models]
    paths = dict(models)
    home = homes(names, args.meshes)
    per_mesh = max(sum(1 for n in names if home[n] == i) for i in range(args.meshes))
    budget = int((per_mesh + 1) * max(weight_bytes(p) for p in paths.values()) * 1.05)
    residency: dict[str, Any] = {"min_residency_s": args.min_residency, "sleep_level": 2}
    if mode != "static":
        residency["weights_budget_bytes"] = budget
    engine = {**DEMO_ENGINE, "device": "cpu", "residency": residency}
    entries = [
        {"name": n, "path": str(paths[n]), "rate": round(max(rates[n], 0.01), 4)} for n in names
    ]
    meshes = [
        {"name": f"mesh-{i}", "gpus": [i], "models": [{"name": n} for n in names if home[n] == i]}
        for i in range(args.meshes)
    ]
    config: dict[str, Any] = {"models": entries, "engine": engine, "meshes": meshes}
    if mode == "replan":
        config["router"] = {"replan": {**replan_settings(args, cluster), "add_models": True}}
    return config


def replan_settings(args: argparse.Namespace, cluster: Path) -> dict[str, Any]:
    return {
        "cluster": str(cluster),
        "interval_s": args.replan_interval,
        "window_s": args.replan_window,
        "drift": 0.5,
        "rate_floor": 0.5,
        "check_s": 0.5,
        "move_cost_s": 0.2,
        "time_limit_s": 2.0,
    }


def build_config(
    mode: str,
    models: list[tuple[str, Path]],
    spec: WorkloadSpec,
    args: argparse.Namespace,
    cluster: Path,
) -> dict[str, Any]:
    names = [n for n, _ in models]
    paths = dict(models)
    rates = dict(zip(spec.models, spec.model_rates(), strict=True))
    budget = int(args.fit * max(weight_bytes(p) for p in paths.values()) * 1.05)
    engine = {
        **DEMO_ENGINE,
        "device": "cpu",
        "residency": {
            "weights_budget_bytes": budget,
            "min_residency_s": args.min_residency,
            "sleep_level": 2,
            "wake_timeout_s": 30.0,
        },
    }
    mesh_names = [f"mesh-{i}" for i in range(args.meshes)]
    by_rate = sorted(names, key=lambda n: -rates[n])
    if mode == "static":
        placed = by_rate[: args.fit * args.meshes]
        entries = [{"name": n, "path": str(paths[n]), "rate": round(rates[n], 4)} for n in placed]
        meshes = [
            {"name": m, "gpus": [i], "models": [{"name": n} for n in placed[i :: args.meshes]]}
            for i, m in enumerate(mesh_names)
        ]
        return {"models": entries, "engine": engine, "meshes": meshes}
    home = homes(names, args.meshes)
    awake: set[str] = set()
    for i in range(args.meshes):
        awake |= set([n for n in by_rate if home[n] == i][: args.fit])
    entries = [
        {
            "name": n,
            "path": str(paths[n]),
            "rate": round(max(rates[n], 0.01), 4),
            "initial_state": "awake" if n in awake else "asleep",
        }
        for n in names
    ]
    meshes = []
    for i, m in enumerate(mesh_names):
        listed: list[dict[str, Any]] = [{"name": n} for n in names if home[n] == i]
        if mode == "replan":  # standby everywhere else
            listed += [{"name": n, "initial_state": "asleep"} for n in names if home[n] != i]
        meshes.append({"name": m, "gpus": [i], "models": listed})
    config: dict[str, Any] = {"models": entries, "engine": engine, "meshes": meshes}
    if mode == "replan":
        config["router"] = {"replan": replan_settings(args, cluster)}
    return config


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [
        (s.name, dict(s.labels), float(s.value))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def wake_quantiles(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """p50 and p99 of every wake on every mesh: the upper bound of the histogram bucket the
    quantile falls in (seconds), and the count."""
    buckets: dict[float, float] = {}
    for name, labels, value in samples:
        if name == "muxserve:model_wake_seconds_bucket":
            le = float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + value
    total = buckets.get(math.inf, 0.0)
    out: dict[str, Any] = {"wakes": int(total)}
    for q in (50, 99):
        bound = next((le for le in sorted(buckets) if buckets[le] >= total * q / 100), None)
        out[f"p{q}_s"] = bound if total else None
    return out


def models_per_mesh(
    samples: list[tuple[str, dict[str, str], float]], config: dict[str, Any]
) -> dict[str, int]:
    """Models awake on each mesh at some time: awake at start (listed, not asleep), or woken."""
    asleep = {m["name"] for m in config["models"] if m.get("initial_state") == "asleep"}
    seen: dict[str, set[str]] = {}
    for mesh in config["meshes"]:
        seen[mesh["name"]] = {
            mm["name"]
            for mm in mesh["models"]
            if mm.get("initial_state") != "asleep" and mm["name"] not in asleep
        }
    for name, labels, value in samples:
        if name == "muxserve:model_wakes_total" and value > 0:
            seen.setdefault(labels["mesh"], set()).add(labels["model_name"])
    return {m: len(s) for m, s in sorted(seen.items())}


def run_one(
    trace_kind: str, mode: str, repeat: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    models = model_list(args.copies)
    names = [n for n, _ in models]
    tokenizer = load_tokenizer(models[0][1])
    cluster = work / "cluster.yaml"
    cluster.write_text(json.dumps({"gpu": STAND_IN_GPU, "nodes": 1, "gpus_per_node": args.meshes}))
    if trace_kind == "crowd":
        entries, meta, planned = crowd_trace(names, args, args.seed + repeat, tokenizer)
        raw = build_crowd_config(mode, models, planned, args, cluster)
    else:
        spec = spec_for(trace_kind, names, args, args.seed + repeat)
        entries, meta = generate(spec, tokenizer)
        raw = build_config(mode, models, spec, args, cluster)
    trace = Trace(tuple(entries), meta)
    cfg_path = work / f"{trace_kind}-{mode}-{repeat}.yaml"
    dump_config(parse_config(raw), cfg_path)
    log_path = work / f"{trace_kind}-{mode}-{repeat}.log"
    slo = SLO(ttft_s=args.slo_ttft_ms / 1000, tpot_s=args.slo_tpot_ms / 1000)
    with (
        log_path.open("w") as log,
        ServerProcess(cfg_path, log=log, extra_args=("--log-level", "INFO")) as url,
    ):
        opts = ClientOptions(url, ignore_eos=True, progress=False, label=f"{trace_kind}/{mode}")
        result = run_replay(trace, opts)
        samples = metric_samples(url)
    summary = summarize(result.records, result.duration_s, slo)["overall"]
    text = log_path.read_text()
    return {
        "trace": trace_kind,
        "mode": mode,
        "repeat": repeat,
        "requests": summary["requests"],
        "completed": summary["completed"],
        "slo_attainment": summary["slo_attainment"],
        "throughput": summary["request_throughput"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "ttft_p99_ms": summary["ttft_ms"]["p99"],
        "models_per_mesh": models_per_mesh(samples, raw),
        **wake_quantiles(samples),
        "moved": text.count("INFO muxserve.router.router: moving "),
        "replans": text.count("INFO muxserve.router.replan: re-planning ("),
        "changes": [  # the router's log of every re-planning round and move
            line.split(" INFO ", 1)[1]
            for line in text.splitlines()
            if " INFO muxserve.router.replan: re-planning (" in line
            or " INFO muxserve.router.router: moving " in line
        ],
        "load_avg": list(os.getloadavg()),
    }


def med(xs: list[float | None]) -> dict[str, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for trace in dict.fromkeys(r["trace"] for r in runs):
        for mode in dict.fromkeys(r["mode"] for r in runs):
            rs = [r for r in runs if r["trace"] == trace and r["mode"] == mode]
            if not rs:
                continue
            keys = ("slo_attainment", "throughput", "p50_s", "p99_s", "moved", "wakes")
            agg = {k: med([r[k] for r in rs]) for k in keys}
            agg["models_per_mesh"] = {
                m: med([r["models_per_mesh"].get(m, 0) for r in rs])["median"]
                for m in rs[0]["models_per_mesh"]
            }
            out.setdefault(trace, {})[mode] = agg
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(agg: dict[str, Any]) -> str:
    lines = [
        f"{'trace':9} {'mode':7} {'SLO att.':>18} {'req/s':>16} {'models/mesh':>12} "
        f"{'wake p50/p99 s':>15} {'moved':>6}"
    ]
    for trace, modes in agg.items():
        for mode, a in modes.items():
            s, t = a["slo_attainment"], a["throughput"]
            att = f"{fmt(s['median'], '.1%')} [{fmt(s['min'], '.0%')}-{fmt(s['max'], '.0%')}]"
            thr = f"{fmt(t['median'], '.2f')} [{fmt(t['min'], '.2f')}-{fmt(t['max'], '.2f')}]"
            mpm = "/".join(fmt(v, "g") for v in a["models_per_mesh"].values())
            wake = f"{fmt(a['p50_s']['median'], 'g')}/{fmt(a['p99_s']['median'], 'g')}"
            lines.append(
                f"{trace:9} {mode:7} {att:>18} {thr:>16} {mpm:>12} {wake:>15} "
                f"{fmt(a['moved']['median'], 'g'):>6}"
            )
    return "\n".join(lines)


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(agg)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "slo_attainment", "SLO attainment"),
        (axes[1], "throughput", "served requests/s"),
    ):
        width = 0.8 / len(MODES)
        for k, mode in enumerate(MODES):
            xs, ys, lo, hi = [], [], [], []
            for i, trace in enumerate(traces):
                a = agg[trace].get(mode)
                if a is None or a[key]["median"] is None:
                    continue
                xs.append(i + (k - (len(MODES) - 1) / 2) * width)
                ys.append(a[key]["median"])
                lo.append(a[key]["median"] - a[key]["min"])
                hi.append(a[key]["max"] - a[key]["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=mode)
        ax.set_xticks(range(len(traces)), traces)
        ax.set_ylabel(label)
        if key == "slo_attainment":
            ax.axhline(0.9, color="gray", linestyle=":", linewidth=1)
            ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--copies", type=int, default=6, help="copies of each demo model")
    p.add_argument("--meshes", type=int, default=2)
    p.add_argument("--fit", type=int, default=2, help="models a mesh's weights budget holds")
    p.add_argument("--rate", type=float, default=10.0, help="req/s over all models")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--traces", nargs="+", choices=TRACES, default=list(TRACES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=300.0)
    p.add_argument("--min-residency", type=float, default=1.0, help="residency policy (s)")
    p.add_argument("--replan-interval", type=float, default=10.0)
    p.add_argument("--replan-window", type=float, default=5.0)
    p.add_argument("--crowd-hot", type=int, default=2, help="crowd: hot models")
    p.add_argument(
        "--crowd-warm", type=float, default=0.25, help="crowd: share of the run before the shift"
    )
    p.add_argument("--crowd-prompt", default="uniform:16:32", help="crowd: prompt tokens")
    p.add_argument("--crowd-output", default="uniform:8:16", help="crowd: output tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/elastic")
    p.add_argument("--name", default="elastic", help="file stem of the JSON and PNG in --out")
    args = p.parse_args()
    if args.copies < 1 or args.meshes < 1 or args.fit < 1 or args.repeats < 1:
        p.error("--copies, --meshes, --fit and --repeats must be at least 1")
    if args.fit * args.meshes >= 2 * args.copies and args.traces != ["crowd"]:
        p.error("every model fits: raise --copies or lower --fit for more models than memory")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the meshes share the CPU
    start = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as tmp:
        for repeat in range(args.repeats):
            for trace in args.traces:
                for mode in args.modes:
                    r = run_one(trace, mode, repeat, args, Path(tmp))
                    runs.append(r)
                    print(
                        f"{trace}/{mode} #{repeat}: SLO {fmt(r['slo_attainment'], '.1%')}, "
                        f"{r['throughput']:.2f} req/s, moved {r['moved']}, wakes {r['wakes']}, "
                        f"load {r['load_avg'][0]:.1f}",
                        file=sys.stderr,
                    )
    agg = aggregate(runs)
    n = 2 * args.copies
    fit = args.fit * args.meshes
    title = (
        f"{n} models, {fit} fit at once ({n / fit:g}x), {args.meshes} CPU meshes, "
        f"{args.rate:g} req/s, {args.repeats} repeats (median, min-max)"
    )
    if args.traces == ["crowd"]:
        title = (
            f"hot set moves onto one mesh: {n} models, {args.crowd_hot} hot, {args.meshes} CPU "
            f"meshes, {args.rate:g} req/s, {args.duration:g} s, {args.repeats} repeats "
            "(median, min-max)"
        )
    table = report(agg)
    print(title)
    print(table)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    write_json(
        out / f"{args.name}.json",
        {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "title": title,
            "machine": machine(),
            "load_avg_end": list(load),
            "elapsed_s": round(time.time() - start, 1),
            "slo_ms": {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms},
            "summary": agg,
            "runs": runs,
        },
    )
    plot(agg, out / f"{args.name}.png", title)
    print(f"wrote {out / args.name}.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
