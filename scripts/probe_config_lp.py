"""Probe the configuration LP at scale: column generation on the whole instance from the pool.

The planner's plan at scale comes from small searches (`plan_by_deals`: one snake deal, then
replan, grow, replan); how far its plan is from the whole instance's configuration LP is what
docs/placement.md "Limits" quotes. This script measures it reproducibly: it builds the
instance (64 models on 64 GPUs by default), makes the pool as the planner does
(`plan_by_deals` with its default steps), then grows the whole-instance master LP from that
pool by column generation — each round the master LP's duals price every mesh size by branch
and bound (`price`, 20,000 nodes, 10 configurations kept), with the MIP (`price_mip`) as the
fallback where branch and bound finds nothing — for `--rounds` rounds, until a CPU-time
budget, or until two rounds in a row add nothing. Per round it records the master LP value,
the columns added and the CPU seconds, and the Lagrangian bound at those duals (the formula
of `BranchAndPrice.lagrangian`: Σ unit prices + Σ rate prices × caps + nodes × the best
node pattern at each size's bound on a configuration's value; each size's bound is the
search's own where it finished, else the MIP's or the pricing LP's — always a valid upper
bound on every placement). The aggregate LP (`BranchAndPrice.aggregate`) is the other bound.
With `--combine 400,800` the pool's integer master (`ColumnPool.combine`) runs over the
grown columns, the best 400 and 800 of them, from the planner's plan.

Seams used here: the unrestricted master LP and its duals (`BranchAndPrice.master.lp`),
and two private ones (no public method does this; kept inside this script): a priced
configuration moved to a model's cheapest replica (`to_units`), and `lagrangian`.

Writes JSON (command, load average before and after, per-round values, bounds, plans) and a
PNG (master LP value against CPU seconds, the plans and the bound as horizontal lines).

    python scripts/probe_config_lp.py --cpu-budget 300 --combine 400,800
    python scripts/probe_config_lp.py --instance small --models 5 --nodes 2 --gpus-per-node 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_placement import CONFIGS, large_problem, paper_problem  # noqa: E402

from muxserve.models.hf_config import load_hf_config  # noqa: E402
from placement.candidates import CandidateTable, Mode, build_candidates  # noqa: E402
from placement.column_generation import BranchAndPrice  # noqa: E402
from placement.column_pool import ColumnPool  # noqa: E402
from placement.configurations import Config, price, price_bound, price_mip  # noqa: E402
from placement.deadline import Deadline  # noqa: E402
from placement.decomposition import plan_by_deals  # noqa: E402
from placement.gpus import make_cluster  # noqa: E402
from placement.instance import Instance  # noqa: E402
from placement.master import Branch, Incumbent  # noqa: E402
from placement.problem import Problem, make_problem  # noqa: E402
from placement.specs import spec_from_config  # noqa: E402
from placement.workload import WorkloadFile, paper_workload, parse_workload  # noqa: E402

PRICING_NODES = 20_000  # branch-and-bound nodes per pricing call (as the offline runs)
PRICING_KEEP = 10  # configurations kept per pricing call
EMPTY_ROUNDS = 2  # rounds in a row that add nothing: the LP is (as far as pricing sees) optimal
OUT = ROOT / "benchmarks" / "results" / "placement" / "config_lp_probe"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def small_problem(
    models: int, nodes: int, gpus_per_node: int, alpha: float, max_rate: float, slo_scale: float
) -> Problem:
    """`models` Llama models (7B and 13B in turn) on nodes × gpus_per_node A100-80GB."""
    kinds = [("7b", "13b")[k % 2] for k in range(models)]
    configs = {k: load_hf_config(CONFIGS / "models" / f"llama-{k}") for k in set(kinds)}
    specs = [
        spec_from_config(f"llm-{i}", str(CONFIGS / "models" / f"llama-{k}"), configs[k])
        for i, k in enumerate(kinds)
    ]
    raw = paper_workload([s.name for s in specs], alpha, max_rate, slo_scale)
    wl = parse_workload(WorkloadFile.model_validate(raw))
    return make_problem(specs, wl, make_cluster("A100-80GB", nodes, gpus_per_node))


def build_problem(args: argparse.Namespace) -> tuple[Problem, str]:
    """The instance the arguments name, and a line that names it (for logs and the plot)."""
    if args.instance == "large":
        p = large_problem(args.alpha, args.max_rate, args.slo_scale)
    elif args.instance == "paper":
        p = paper_problem(args.alpha, args.max_rate, args.slo_scale)
    else:
        p = small_problem(args.models, args.nodes, args.gpus_per_node, args.alpha,
                          args.max_rate, args.slo_scale)  # fmt: skip
    c = p.cluster
    name = (f"{args.instance}: {p.num_models} models on {c.nodes}x{c.gpus_per_node} "
            f"{c.gpu.name}, alpha {args.alpha}, max rate {args.max_rate}")  # fmt: skip
    return p, name


def price_round(
    bp: BranchAndPrice, unit_price: list[float], weight: dict[int, float],
    size_price: dict[int, float], mip_limit: float,
) -> tuple[list[Config], dict[int, float], bool]:  # fmt: skip
    """One pricing round at the master's duals: the configurations found, each size's bound
    on a configuration's value, and whether every size was priced exactly."""
    model_price = {i: min(unit_price[k] for k in ks) for i, ks in bp.model_units.items()}
    found: list[Config] = []
    upper: dict[int, float] = {}
    exact = True
    for s in bp.inst.sizes:
        options = bp.options[s]
        pb = price(s, options, model_price, bp.cap, PRICING_KEEP, size_price[s], weight,
                   node_limit=PRICING_NODES)  # fmt: skip
        found += [c for _, c in pb.configs]
        bound, exact_here = pb.upper, pb.exact
        if not pb.configs:  # branch and bound found nothing: the MIP, as the offline runs
            mip = price_mip(s, options, model_price, bp.cap, size_price[s], mip_limit, weight)
            found += [c for _, c in mip.configs]
            bound, exact_here = min(bound, mip.upper), pb.exact or mip.exact
        if not exact_here or bound == math.inf:
            bound = min(bound, price_bound(options, model_price, bp.cap, weight))
        upper[s] = bound
        exact = exact and exact_here
    return [bp.to_units(c, unit_price) for c in found], upper, exact


def grow(
    bp: BranchAndPrice, rounds: int | None, cpu_budget: float | None, mip_limit: float, t0: float
) -> tuple[list[dict], str]:
    """Column generation on the unrestricted master from its columns so far."""
    out: list[dict] = []
    empty, r = 0, 0
    while True:
        if rounds is not None and r >= rounds:
            return out, "rounds"
        if cpu_budget is not None and time.process_time() - t0 >= cpu_budget:
            return out, "cpu budget"
        master = bp.master.lp(Branch(), Deadline.never())
        if master is None:
            return out, "master LP not solved"
        lp, unit_price, weight, size_price = master
        found, upper, exact = price_round(bp, unit_price, weight, size_price, mip_limit)
        added = sum(bp.add(c) for c in found)
        row = {"round": r, "master_lp": lp.value, "added": added, "columns": len(bp.configs),
               "cpu_s": time.process_time() - t0, "exact": exact,
               "lagrangian": bp.lagrangian(unit_price, weight, upper)}  # fmt: skip
        out.append(row)
        log(f"round {r}: master LP {lp.value:.3f}, added {added}, "
            f"{row['cpu_s']:.1f} CPU-s, Lagrangian {row['lagrangian']:.1f}"
            f"{'' if exact else ' (inexact pricing)'}")  # fmt: skip
        r += 1
        empty = 0 if added else empty + 1
        if empty >= EMPTY_ROUNDS:
            return out, "no improving column"


def combine(table: CandidateTable, bp: BranchAndPrice, start: Incumbent, columns: list[int],
            time_limit: float, backend: str) -> list[dict]:  # fmt: skip
    """The pool's integer master over the grown columns (the best `columns` of them at the
    LP's duals), from the planner's plan: the plan each gives and its CPU seconds."""
    out = []
    for cols in columns:
        pool = ColumnPool()
        pool.add(bp.configs)
        t = time.process_time()
        found = pool.combine(table, start, deadline=Deadline.after(time_limit),
                             backend=backend, columns=cols)  # fmt: skip
        row = {"columns": cols, "plan": None if found is None else found.value,
               "cpu_s": time.process_time() - t}  # fmt: skip
        log(f"combine over the best {cols}: {row['plan']} req/s, {row['cpu_s']:.1f} CPU-s")
        out.append(row)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    # each round's master LP was solved when the round before it ended; the last point is
    # the master over the last round's columns too
    rounds = res["rounds"]
    xs = [0.0] + [r["cpu_s"] for r in rounds[:-1]] + [res["cg_cpu_s"]]
    ys = [r["master_lp"] for r in rounds] + [res["final_master_lp"]]
    ax.plot(xs, ys, marker=".", label="master LP")
    plan = res["pool"]["plan"]
    ax.axhline(plan, color="gray", ls=":", label=f"planner's plan {plan:.1f}")
    for c, color in zip(res["combine"], ("tab:green", "tab:olive", "tab:cyan"), strict=False):
        if c["plan"] is not None:
            label = f"integer master, best {c['columns']}: {c['plan']:.1f}"
            ax.axhline(c["plan"], color=color, ls="--", label=label)
    bound, which = res["bound"], res["bound_from"]
    if bound is not None:
        ax.axhline(bound, color="tab:red", ls="-.", label=f"bound ({which}) {bound:.1f}")
    ax.set_xlabel("CPU seconds (from the pool)")
    ax.set_ylabel("req/s")
    ax.set_title(f"Configuration LP by column generation\n{res['instance']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instance", choices=("large", "paper", "small"), default="large")
    ap.add_argument("--models", type=int, default=5, help="small: how many models")
    ap.add_argument("--nodes", type=int, default=2, help="small: nodes")
    ap.add_argument("--gpus-per-node", type=int, default=4, help="small: GPUs per node")
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--max-rate", type=float, default=100.0)
    ap.add_argument("--slo-scale", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=None, help="pricing rounds at most")
    ap.add_argument(
        "--cpu-budget",
        type=float,
        default=None,
        help="CPU seconds of column generation at most (no new round after)",
    )
    ap.add_argument("--pool-time", type=float, default=200.0, help="plan_by_deals' deadline")
    ap.add_argument("--mip-limit", type=float, default=60.0, help="seconds per pricing MIP")
    ap.add_argument("--combine", default="", help="comma-separated column counts, e.g. 400,800")
    ap.add_argument("--combine-limit", type=float, default=300.0, help="seconds per combine")
    ap.add_argument("--backend", default="highs")
    ap.add_argument("--out", type=Path, default=OUT, help="path without suffix: .json, .png")
    args = ap.parse_args(argv)  # fmt: skip
    if args.rounds is None and args.cpu_budget is None:
        ap.error("give --rounds or --cpu-budget (or both)")
    try:
        columns = [int(c) for c in args.combine.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--combine {args.combine!r}: give column counts, e.g. 400,800")
    if any(c < 1 for c in columns):
        ap.error(f"--combine {args.combine!r}: column counts must be positive")

    load_before = os.getloadavg()
    t_wall, t0 = time.time(), time.process_time()
    p, name = build_problem(args)
    table = build_candidates(p, Mode.MUX)
    pool = ColumnPool()
    best, cut = plan_by_deals(table, deadline=Deadline.after(args.pool_time), pool=pool,
                              backend=args.backend)  # fmt: skip
    if best is None:
        raise SystemExit(f"{name}: the planner found no plan")
    pool_cpu = time.process_time() - t0
    log(f"{name}: plan {best.value:.3f} req/s, {len(pool)} pooled meshes, {pool_cpu:.1f} CPU-s"
        f"{' (deadline cut it)' if cut else ''}")  # fmt: skip

    bp = BranchAndPrice(Instance.whole(table), backend=args.backend, label="probe")
    for cfg in pool.configs:
        bp.add(cfg)
    agg = bp.aggregate()
    aggregate = None if agg is None else agg.value
    t1 = time.process_time()
    rounds, stopped = grow(bp, args.rounds, args.cpu_budget, args.mip_limit, t1)
    final = bp.master.lp(Branch(), Deadline.never())  # over the last round's columns too
    plans = combine(table, bp, best, columns, args.combine_limit, args.backend)

    lag = [r["lagrangian"] for r in rounds if math.isfinite(r["lagrangian"])]
    lag_exact = [r["lagrangian"] for r in rounds if r["exact"] and math.isfinite(r["lagrangian"])]
    candidates = [(b, w) for b, w in ((aggregate, "aggregate LP"),
                  (min(lag, default=None), "Lagrangian")) if b is not None]  # fmt: skip
    bound, bound_from = min(candidates) if candidates else (None, None)
    shown = sys.argv[1:] if argv is None else argv
    res = {
        "command": " ".join(["python scripts/probe_config_lp.py", *shown]),
        "instance": name,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "pool": {"plan": best.value, "meshes": len(pool), "cpu_s": pool_cpu, "cut": cut},
        "aggregate_bound": aggregate,
        "lagrangian_best": min(lag, default=None),
        "lagrangian_best_exact": min(lag_exact, default=None),
        "bound": bound,
        "bound_from": bound_from,
        "rounds": rounds,
        "stopped": stopped,
        "final_master_lp": None if final is None else final[0].value,
        "cg_cpu_s": time.process_time() - t1,
        "combine": plans,
        "wall_s": time.time() - t_wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.out.with_suffix(".png"))
    log(f"wrote {args.out.with_suffix('.json')} and .png")
    return res


if __name__ == "__main__":
    main()
