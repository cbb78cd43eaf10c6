"""Benchmark the placement algorithms on the paper's setup and on a 64-model cluster.

For each rate scale and α: the ILP, the paper's greedy, spatial and temporal plans of the 19
paper models on 4 × 8 A100-80GB — estimated throughput, simulated throughput and SLO
attainment, ratios to spatial, solve times and the ILP's gap; then the ILP on 64 models and
64 GPUs (solve time and gap). Writes JSON and a PNG.

    python scripts/bench_placement.py [--out benchmarks/results/placement] [--duration 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from muxserve.models.hf_config import load_hf_config  # noqa: E402
from placement.algorithms import ALGORITHMS, SolveOptions, solve  # noqa: E402
from placement.gpus import load_cluster  # noqa: E402
from placement.ilp import solve_ilp  # noqa: E402
from placement.problem import Problem, make_problem  # noqa: E402
from placement.simulator import simulate  # noqa: E402
from placement.specs import load_models, spec_from_config  # noqa: E402
from placement.workload import PAPER_ALPHAS, WorkloadFile, paper_workload, parse_workload  # noqa: E402

CONFIGS = ROOT / "configs"
PAPER_MAX_RATE = 40.0  # the paper's generator: model i gets 40 × (i + 1)^-α req/s


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def paper_problem(alpha: float, max_rate: float, slo_scale: float) -> Problem:
    ms = load_models(CONFIGS / "models" / "paper-19.yaml")
    cluster = load_cluster(CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml")
    names = [s.name for s in ms.specs]
    wl = parse_workload(
        WorkloadFile.model_validate(paper_workload(names, alpha, max_rate, slo_scale))
    )
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


def run_paper(scale: float, args: argparse.Namespace) -> list[dict]:
    rows = []
    for alpha in PAPER_ALPHAS:
        p = paper_problem(alpha, PAPER_MAX_RATE * scale, args.slo_scale)
        options = SolveOptions(time_limit=args.time_limit, threads=args.threads)
        plans = solve(p, ALGORITHMS, options, progress=None)
        row: dict = {"scale": scale, "alpha": alpha, "requested": p.total_rate}
        for name, plan in plans.items():
            entry = {
                "estimated": plan.served_total,
                "solve_s": plan.solve_time_s,
                "status": plan.status,
                "gap": plan.gap,
                "gpus": plan.gpus_used,
                "meshes": [m.size for m in plan.meshes],
            }
            if args.duration > 0:
                t0 = time.perf_counter()
                sim = simulate(plan, p, window_s=args.duration)
                entry |= {
                    "simulated": sim.throughput,
                    "slo_attainment": sim.slo_attainment,
                    "sim_wall_s": time.perf_counter() - t0,
                }
            row[name] = entry
        base = row["spatial"]
        for name in ALGORITHMS:
            row[name]["x_spatial_est"] = row[name]["estimated"] / base["estimated"]
            if "simulated" in row[name]:
                row[name]["x_spatial_sim"] = row[name]["simulated"] / base["simulated"]
        log(
            f"scale {scale} α {alpha}: "
            + ", ".join(
                f"{n} {row[n]['estimated']:.1f}"
                + (f"/{row[n]['simulated']:.1f}" if "simulated" in row[n] else "")
                for n in ALGORITHMS
            )
            + f" req/s; ilp {row['ilp']['solve_s']:.2f} s ({row['ilp']['status']})"
        )
        rows.append(row)
    return rows


def run_large(args: argparse.Namespace) -> dict:
    p = large_problem(args.large_alpha, args.large_max_rate, args.slo_scale)
    plans = solve(p, ("greedy",), progress=None)
    t0 = time.perf_counter()
    ilp = solve_ilp(p, warm_start=plans["greedy"], time_limit=args.large_time_limit,
                    threads=args.threads, progress=log)  # fmt: skip
    wall = time.perf_counter() - t0 + plans["greedy"].solve_time_s
    out = {
        "models": p.num_models,
        "gpus": p.cluster.num_gpus,
        "alpha": args.large_alpha,
        "max_rate": args.large_max_rate,
        "requested": p.total_rate,
        "greedy": {"estimated": plans["greedy"].served_total,
                   "solve_s": plans["greedy"].solve_time_s},
        "ilp": {"estimated": ilp.served_total, "solve_s": wall, "status": ilp.status,
                "gap": ilp.gap, "time_limit_s": args.large_time_limit},
    }  # fmt: skip
    log(f"64 × 64: ilp {ilp.served_total:.1f} req/s in {wall:.1f} s, gap {ilp.gap}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r["scale"] for r in rows})
    fig, axes = plt.subplots(len(scales), 3, figsize=(14, 3.6 * len(scales)), squeeze=False)
    for k, scale in enumerate(scales):
        rs = [r for r in rows if r["scale"] == scale]
        alphas = [r["alpha"] for r in rs]
        rate = PAPER_MAX_RATE * scale
        ax_t, ax_r, ax_s = axes[k]
        for name in ALGORITHMS:
            (line,) = ax_t.plot(alphas, [r[name]["estimated"] for r in rs], "o-", label=name)
            if "simulated" in rs[0][name]:
                ax_t.plot(alphas, [r[name]["simulated"] for r in rs], "x--", color=line.get_color())
                ax_s.plot(alphas, [100 * r[name]["slo_attainment"] for r in rs], "o-",
                          color=line.get_color(), label=name)  # fmt: skip
            key = "x_spatial_sim" if "simulated" in rs[0][name] else "x_spatial_est"
            ax_r.plot(alphas, [r[name][key] for r in rs], "o-", color=line.get_color(), label=name)
        ax_t.plot(alphas, [r["requested"] for r in rs], "k:", label="requested")
        ax_t.set_title(f"max rate {rate:g} req/s: throughput (o est, x sim)")
        ax_t.set_xlabel("α")
        ax_t.set_ylabel("req/s")
        ax_t.legend(fontsize=7)
        ax_r.set_title("throughput / spatial (simulated)")
        ax_r.set_xlabel("α")
        ax_s.set_title("SLO attainment (%)")
        ax_s.set_xlabel("α")
        ax_s.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "placement")
    ap.add_argument("--scales", default="1.0,2.5",
                    help="multiples of the paper's max rate (40 req/s)")  # fmt: skip
    ap.add_argument("--slo-scale", type=float, default=8.0)
    ap.add_argument("--time-limit", type=float, default=9.0, help="ILP seconds, paper setup")
    ap.add_argument("--duration", type=float, default=20.0,
                    help="simulated seconds measured after warm-up (0: no simulation)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--large-alpha", type=float, default=0.7)
    ap.add_argument("--large-max-rate", type=float, default=100.0)
    ap.add_argument("--large-time-limit", type=float, default=100.0)
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in (float(x) for x in args.scales.split(",")):
        rows += run_paper(scale, args)
    result = {"command": " ".join(sys.argv), "paper": rows}
    if not args.skip_large:
        result["large"] = run_large(args)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out / "bench.png")
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
