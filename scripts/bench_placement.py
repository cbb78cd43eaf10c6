"""Benchmark the placement algorithms on the paper's setup, on 64 models, and with replicas.

1. The paper's 19 models on 4 x 8 A100-80GB (measured A100 profile), rates 1x and 2.5x the
   paper's (max 40 and 100 req/s), alpha in {0.7, 0.9, 1.3, 1.7, 2.1}: ILP, our greedy, the
   authors' algorithm (muxserve, its own time limit), spatial and temporal plans — estimated
   throughput under our estimator and under the authors' (`placement.authors`), bound, gap,
   solve time; simulated throughput and SLO attainment for the --simulate algorithms, under
   each --contention mode (default: jobs that run at once share SMs and HBM bandwidth, and
   without contention), and which estimator the simulation sides with (a quick simulation:
   2 s window, warm-up and drain of one planned request latency; a plan equal to one
   already simulated, or a mesh already replayed, is not simulated again).
2. The warm start (candidate table + greedy) on the paper instances: CPU and wall seconds,
   medians over --repeats.
3. 64 models (40 x 7B, 14 x 13B, 6 x 30B, 4 x 65B) on 8 x 8 A100-80GB (fitted analytic model),
   alpha 0.7, max rate 100: the ILP within --large-time-limit, --runs times (plan, bound, gap,
   wall and CPU time, overshoot, the work done, the difference between runs).
4. Replicas: the paper's models with one very hot model (llm-0 at --hot-rate req/s), planned
   with 1 and with --replicas meshes per model, estimated and simulated.

Writes bench.json (with the command, the load average before and after, wall and CPU
seconds), bench.png and bench.md. The default run took 4 min 47 s wall on a quiet machine
(287 CPU-seconds; 727 s wall at load 7-8).

    python scripts/bench_placement.py [--out benchmarks/results/placement] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_placement_report import (  # noqa: E402
    PAPER_MAX_RATE,
    markdown,
    plot,
    plot_large,
    sides_with,
)

from muxserve.models.hf_config import load_hf_config  # noqa: E402
from placement.algorithms import ALGORITHMS, SolveOptions, solve  # noqa: E402
from placement.authors import authors_estimate, own_estimate  # noqa: E402
from placement.candidates import Mode, build_candidates  # noqa: E402
from placement.contention import CONTENTION_MODES  # noqa: E402
from placement.gpus import load_cluster  # noqa: E402
from placement.greedy import solve_greedy  # noqa: E402
from placement.plan import Placement  # noqa: E402
from placement.problem import Problem, make_problem  # noqa: E402
from placement.simulator import MeshCache, simulate  # noqa: E402
from placement.specs import load_models, spec_from_config  # noqa: E402
from placement.workload import (  # noqa: E402
    PAPER_ALPHAS,
    WorkloadFile,
    paper_workload,
    parse_workload,
)

CONFIGS = ROOT / "configs"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load() -> float:
    return os.getloadavg()[0]


def paper_problem(
    alpha: float, max_rate: float, slo_scale: float, hot: float | None = None
) -> Problem:
    """The paper's 19 models on its cluster; `hot`: llm-0's rate instead of the power law's."""
    ms = load_models(CONFIGS / "models" / "paper-19.yaml")
    cluster = load_cluster(CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml")
    names = [s.name for s in ms.specs]
    raw = paper_workload(names, alpha, max_rate, slo_scale)
    if hot is not None:
        raw["models"][0]["rate"] = hot
    wl = parse_workload(WorkloadFile.model_validate(raw))
    return make_problem(ms.specs, wl, cluster, engine=ms.engine, entries=ms.entries)


def large_problem(alpha: float, max_rate: float, slo_scale: float) -> Problem:
    """64 models (40 × 7B, 14 × 13B, 6 × 30B, 4 × 65B) on 8 nodes × 8 A100-80GB."""
    kinds = ["7b"] * 40 + ["13b"] * 14 + ["30b"] * 6 + ["65b"] * 4
    configs = {k: load_hf_config(CONFIGS / "models" / f"llama-{k}") for k in set(kinds)}
    specs = [
        spec_from_config(f"llm-{i}", str(CONFIGS / "models" / f"llama-{k}"), configs[k])
        for i, k in enumerate(kinds)
    ]
    names = [s.name for s in specs]
    wl = parse_workload(
        WorkloadFile.model_validate(paper_workload(names, alpha, max_rate, slo_scale))
    )
    return make_problem(specs, wl, load_cluster(CONFIGS / "clusters" / "8x8-a100-80gb.yaml"))


def summary(plan: Placement) -> dict:
    return {
        "estimated": plan.served_total,
        "bound": plan.bound,
        "gap": plan.gap,
        "solve_s": plan.solve_time_s,
        "status": plan.status,
        "gpus": plan.gpus_used,
        "meshes": [m.size for m in plan.meshes],
        "notes": list(plan.notes),
    }


def simulated(
    plan: Placement, p: Problem, args: argparse.Namespace, cache: MeshCache, modes: tuple
) -> dict:
    """The plan simulated under each of `modes` (the first is `simulated`, `none` is
    `simulated_none`): throughput, SLO attainment, meshes where jobs slowed each other."""
    out: dict = {}
    for mode in modes:
        c0 = time.process_time()
        sim = simulate(plan, p, window_s=args.duration, min_warmup_s=2.0, settle=1.0, drain=1.0,
                       contention=mode, cache=cache)  # fmt: skip
        tag = "" if mode == modes[0] else f"_{mode}"
        out |= {
            f"simulated{tag}": sim.throughput,
            f"slo_attainment{tag}": sim.slo_attainment,
            f"contended_meshes{tag}": sim.contended_meshes,
            f"sim_cpu_s{tag}": time.process_time() - c0,
        }
    return out


def signature(plan: Placement) -> tuple:
    """What a simulation of the plan depends on: meshes, models, shares, rates."""
    return tuple(sorted(
        (m.size, tuple(sorted((x.name, x.decode_share, x.prefill_share, x.time_share, x.served)
                              for x in m.models)))
        for m in plan.meshes
    ))  # fmt: skip


def run_paper(scale: float, args: argparse.Namespace) -> list[dict]:
    rows = []
    ours = tuple(a for a in ALGORITHMS if a != "muxserve")
    for alpha in PAPER_ALPHAS:
        p = paper_problem(alpha, PAPER_MAX_RATE * scale, args.slo_scale)
        options = SolveOptions(time_limit=args.time_limit, threads=args.threads)
        t0 = time.perf_counter()
        plans = solve(p, ours, options, progress=None)
        row: dict = {"scale": scale, "alpha": alpha, "requested": p.total_rate,
                     "plan_wall_s": time.perf_counter() - t0}  # fmt: skip
        plans |= solve(p, ("muxserve",), SolveOptions(time_limit=args.muxserve_time_limit),
                       progress=None)  # fmt: skip
        sims: dict[tuple, dict] = {}
        cache = MeshCache(p)
        for name in ALGORITHMS:
            plan = plans[name]
            row[name] = summary(plan)
            if name != "temporal":  # their estimator knows SM shares, not time shares
                row[name]["authors_est"] = authors_estimate(p, plan)
            if (own := own_estimate(plan)) is not None:
                row[name]["authors_own"] = own  # theirs, with their own shares
            if args.duration > 0 and name in args.simulate:
                key = signature(plan)
                if key not in sims:
                    sims[key] = simulated(plan, p, args, cache, args.contention) | {
                        "same_plan_as": name
                    }
                row[name] |= sims[key]
        base = row["spatial"]
        for name in ALGORITHMS:
            row[name]["x_spatial_est"] = row[name]["estimated"] / base["estimated"]
            if "simulated" in row[name] and "simulated" in base:
                row[name]["x_spatial_sim"] = row[name]["simulated"] / base["simulated"]
            if "authors_est" in row[name] and "authors_est" in base:
                row[name]["x_spatial_theirs"] = row[name]["authors_est"] / base["authors_est"]
        row["sides_with"] = sides_with(row)
        row["mesh_replays"] = {"replayed": cache.misses, "reused": cache.hits}
        log(
            f"scale {scale} α {alpha}: "
            + ", ".join(
                f"{n} {row[n]['estimated']:.1f}"
                + (f"/{row[n]['simulated']:.1f}" if "simulated" in row[n] else "")
                + (f"/{row[n]['simulated_none']:.1f}" if "simulated_none" in row[n] else "")
                + (f" (theirs {row[n]['authors_est']:.1f})" if "authors_est" in row[n] else "")
                for n in ALGORITHMS
            )
            + f" req/s; ilp {row['ilp']['solve_s']:.2f} s, bound {row['ilp']['bound']:.1f}, "
            f"gap {row['ilp']['gap']:.2%}; simulator sides with "
            f"{row['sides_with'].get('sides_with', '-')}; {cache.misses} mesh replays, "
            f"{cache.hits} reused"
        )
        rows.append(row)
    return rows


def run_warm_start(args: argparse.Namespace) -> list[dict]:
    """Candidate table + greedy on the paper instances: CPU and wall seconds (medians)."""
    rows: list[dict] = []
    medians: list[float] = []
    for scale in (1.0, 2.5):
        for alpha in PAPER_ALPHAS:
            cpu: list[float] = []
            wall: list[float] = []
            table_cpu: list[float] = []
            for _ in range(args.repeats):
                p = paper_problem(alpha, PAPER_MAX_RATE * scale, args.slo_scale)
                c0, w0 = time.process_time(), time.perf_counter()
                table = build_candidates(p, Mode.MUX)
                c1 = time.process_time()
                solve_greedy(p, table, progress=None)
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
                table_cpu.append(c1 - c0)
            rows.append({
                "scale": scale, "alpha": alpha, "cpu_s": statistics.median(cpu),
                "cpu_min_max": [min(cpu), max(cpu)], "wall_s": statistics.median(wall),
                "table_cpu_s": statistics.median(table_cpu), "load": load(),
            })  # fmt: skip
            medians.append(statistics.median(cpu))
    log(f"warm start (table + greedy): median CPU {min(medians):.3f}-{max(medians):.3f} s "
        "over the paper instances")  # fmt: skip
    return rows


def run_large(args: argparse.Namespace) -> dict:
    p = large_problem(args.large_alpha, args.large_max_rate, args.slo_scale)
    runs = []
    for k in range(args.runs):
        before = load()
        t0, c0 = time.perf_counter(), time.process_time()
        plans = solve(p, ("ilp", "greedy"), SolveOptions(time_limit=args.large_time_limit,
                      threads=args.threads), progress=log)  # fmt: skip
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ilp = plans["ilp"]
        runs.append(summary(ilp) | {
            "wall_s": wall,
            "cpu_s": cpu,
            "overshoot": wall / args.large_time_limit - 1,
            "greedy": plans["greedy"].served_total,
            "load_before": before,
            "load_after": load(),
            "placement": sorted((m.name, m.tensor_parallel, m.decode_share, m.served)
                                for m in ilp.models),
        })  # fmt: skip
        greedy = plans["greedy"].served_total
        log(f"64 × 64 run {k + 1}: ilp {ilp.served_total:.1f} req/s, bound {ilp.bound:.1f}, "
            f"gap {ilp.gap:.2%}, {wall:.1f} s ({cpu:.1f} CPU-s, load {before:.1f}-{load():.1f}; "
            f"greedy {greedy:.1f}); {'; '.join(ilp.notes)}")  # fmt: skip
    values = [r["estimated"] for r in runs]
    return {
        "models": p.num_models,
        "gpus": p.cluster.num_gpus,
        "alpha": args.large_alpha,
        "max_rate": args.large_max_rate,
        "requested": p.total_rate,
        "time_limit_s": args.large_time_limit,
        "runs": runs,
        "spread": max(values) - min(values),
        "same_plan": all(r["placement"] == runs[0]["placement"] for r in runs),
        "median": statistics.median(values),
    }


def run_replicas(args: argparse.Namespace) -> dict:
    p = paper_problem(1.3, PAPER_MAX_RATE, args.slo_scale, hot=args.hot_rate)
    out: dict = {"hot_model": "llm-0", "hot_rate": args.hot_rate, "requested": p.total_rate}
    for replicas in (1, args.replicas):
        options = SolveOptions(time_limit=args.time_limit, max_replicas=replicas)
        plan = solve(p, ("ilp",), options, progress=None)["ilp"]
        entry = summary(plan) | {
            "hot_served": plan.served()["llm-0"],
            "hot_replicas": [(m.tensor_parallel, m.served) for m in plan.replicas("llm-0")],
        }
        if args.duration > 0:
            # the first contention mode only: replicas are not about interference
            entry |= simulated(plan, p, args, MeshCache(p), args.contention[:1])
        out[f"replicas_{replicas}"] = entry
        sim = f", simulated {entry['simulated']:.1f}" if "simulated" in entry else ""
        hot = f"{plan.served()['llm-0']:.1f} on {len(plan.replicas('llm-0'))} meshes"
        log(f"replicas ≤ {replicas}: {plan.served_total:.1f} req/s, llm-0 {hot}{sim}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "placement")
    ap.add_argument("--scales", default="1.0,2.5",
                    help="multiples of the paper's max rate (40 req/s)")  # fmt: skip
    ap.add_argument("--slo-scale", type=float, default=8.0)
    ap.add_argument("--time-limit", type=float, default=5.0,
                    help="seconds per paper instance, every algorithm together")  # fmt: skip
    ap.add_argument("--duration", type=float, default=2.0,
                    help="simulated seconds measured after warm-up (0: no simulation); "
                    "requests live 10-60 s here, so the tokens in a window measure the "
                    "requests in flight, and a longer one adds little")  # fmt: skip
    ap.add_argument("--contention", default="shared,none",
                    help="how jobs running at once slow each other in simulation, one "
                    f"simulation per mode ({', '.join(CONTENTION_MODES)}); the first is "
                    "`simulated`")  # fmt: skip
    ap.add_argument("--simulate", default="ilp,greedy,muxserve,spatial",
                    help="the algorithms whose plans are simulated")  # fmt: skip
    ap.add_argument("--muxserve-time-limit", type=float, default=60.0,
                    help="seconds for the authors' algorithm per paper instance")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3, help="warm-start timing repeats")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--large-alpha", type=float, default=0.7)
    ap.add_argument("--large-max-rate", type=float, default=100.0)
    ap.add_argument("--large-time-limit", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=1, help="64 x 64 runs (run-to-run difference)")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--large-only", action="store_true",
                    help="only the 64 x 64 runs, written to large.json (e.g. with a limit "
                    "long enough for the search's work limits)")  # fmt: skip
    ap.add_argument("--hot-rate", type=float, default=200.0, help="llm-0's rate, replicas run")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--from-json", type=Path, default=None,
                    help="only redraw bench.png and bench.md from this bench.json (large.png and "
                    "large.md from a large.json)")  # fmt: skip
    args = ap.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        name = "bench" if "paper" in saved else "large"  # a --large-only run's large.json
        (plot if name == "bench" else plot_large)(saved, args.out / f"{name}.png")
        (args.out / f"{name}.md").write_text(markdown(saved))
        return 0
    args.simulate = tuple(a for a in args.simulate.split(",") if a)
    args.contention = tuple(a for a in args.contention.split(",") if a)
    if not args.contention or any(m not in CONTENTION_MODES for m in args.contention):
        ap.error(f"--contention: modes from {', '.join(CONTENTION_MODES)}, got {args.contention}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result: dict = {"command": " ".join(sys.argv), "load_before": load()}
    if args.large_only:
        result["large"] = run_large(args)
        result |= {"load_after": load(), "wall_s": time.perf_counter() - t0}
        (args.out / "large.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "large.md").write_text(markdown(result))
        plot_large(result, args.out / "large.png")
        log(f"wrote {args.out / 'large.json'} and {args.out / 'large.png'}")
        return 0
    scales = [float(x) for x in args.scales.split(",")]
    result["paper"] = [row for scale in scales for row in run_paper(scale, args)]
    result["warm_start"] = run_warm_start(args)
    result["replicas"] = run_replicas(args)
    if not args.skip_large:
        result["large"] = run_large(args)
    result |= {"load_after": load(), "wall_s": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0}  # fmt: skip
    (args.out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "bench.png")
    (args.out / "bench.md").write_text(markdown(result))
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'} "
        f"in {result['wall_s']:.0f} s, {result['cpu_s']:.0f} CPU-s "
        f"(load {result['load_before']:.2f} -> "
        f"{result['load_after']:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
