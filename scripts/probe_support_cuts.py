"""Probe per-mesh packing cuts on the aggregate LP at scale (64 models / 64 GPUs by default).

docs/placement.md "Limits" asks whether cuts cheaper than the configuration LP can bring the
aggregate bound (`cut_bound`, 611.42 on the 64/64 instance) near the configuration LP's. This
script measures three families at the point where the DFF cuts saturate:
- clique (conflict) cuts Σ_{c∈K} x_c ≤ meshes_s, K pairwise unable to share a mesh: it
  reports the support's conflicting pairs and its largest clique (a cut needs a clique whose
  x add up to more than the meshes);
- cardinality cuts Σ_{c∈S} x_c ≤ k·meshes_s, k the most support items one mesh holds: it
  reports a lower bound on k (smallest items first) against Σ x / meshes;
- the exact separation of the support (`support_cuts`, which contains both as special
  cases): `cut_bound(support=True)` for `--rounds` rounds, each LP solve's value recorded,
  solved by the simplex (as the planner does) and, with `--ipm`, by HiGHS's interior point
  method without crossover (`solver="ipm"`: a point inside the optimal face). Each round
  records the covering LP's value per size: the meshes the support needs fractionally.

Every round is read through `cut_bound`'s `on_round`. Writes JSON (the command, load average
before and after, each variant's rounds) and a PNG of the bounds against the target: a
bound within 2 % of the plan (the plan's value × 1.02).

    python scripts/probe_support_cuts.py --rounds 8 --ipm
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_placement import large_problem  # noqa: E402

from placement.aggregate import Aggregate  # noqa: E402
from placement.candidates import CandidateTable, Mode, build_candidates  # noqa: E402
from placement.cut_bound import ROUNDS, Round, cut_bound  # noqa: E402
from placement.instance import Instance  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "placement" / "support_cuts_probe.json"
LARGE = ROOT / "benchmarks" / "results" / "placement" / "large.json"  # the plan's value


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(table: CandidateTable, rounds: int, support: bool, solver: str) -> dict:
    """cut_bound with every round recorded (value, meshes per size, the covering LP per
    size, CPU-s since the start at the round's end)."""
    solves: list[dict] = []
    last: list[Round] = []
    start = time.process_time()

    def seen(r: Round) -> None:
        last[:] = [r]
        sol = r.solution
        rec = {"cuts": r.cuts, "added": r.added, "value": sol.value,
               "cpu_s": time.process_time() - start,
               "meshes": {str(s): m for s, m in sol.meshes.items() if m > 1e-9},
               "cover": {str(s): [sep.cover_lower, sep.cover_upper]
                         for s, sep in r.support.items()}}  # fmt: skip
        solves.append(rec)
        log(f"  LP {len(solves)}: {sol.value:.4f} with {r.cuts} cuts, +{r.added}, "
            f"cover {rec['cover']}, {rec['cpu_s']:.1f} CPU-s")  # fmt: skip

    found = cut_bound(table, rounds=rounds, support=support, solver=solver, on_round=seen)
    assert found is not None
    res = {"value": found.value, "rounds": found.rounds, "cuts": found.cuts,
           "cpu_s": time.process_time() - start, "solves": solves}  # fmt: skip
    res["point"] = last[0].solution
    return res


def small_families(agg: Aggregate, x: dict, meshes: dict) -> dict:
    """Clique and cardinality statistics of each size's support at the point (x in the
    candidate order of `agg`, which `cut_bound`'s LP shares)."""
    out = {}
    for s in agg.sizes:
        on = np.flatnonzero(x[s] > 1e-9)
        if len(on) == 0:
            continue
        sh, xs = agg.shares[s][on], x[s][on]
        n = len(on)
        pairs = {(a, b) for a, b in itertools.combinations(range(n), 2)
                 if np.any(sh[a] + sh[b] > 1 + 1e-9)}  # fmt: skip
        clique = max([1] + [len(k) for r in (2, 3, 4) for k in itertools.combinations(
            sorted({v for e in pairs for v in e}), r)
            if all(e in pairs for e in itertools.combinations(k, 2))])  # fmt: skip
        used, fit = np.zeros(4), 0
        for k in np.argsort(sh.max(axis=1), kind="stable"):
            if np.all(used + sh[k] <= 1 + 1e-9):
                used, fit = used + sh[k], fit + 1
        out[str(s)] = {"support": n, "sum_x": float(xs.sum()), "meshes": float(meshes[s]),
                       "conflicting_pairs": len(pairs), "largest_clique": clique,
                       "items_one_mesh_holds_at_least": fit,
                       "items_per_mesh": float(xs.sum() / meshes[s])}  # fmt: skip
    return out


def plot(res: dict, path: Path) -> None:
    """Each variant's LP value against CPU seconds, and the target (titled PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("dff", "support_simplex", "support_ipm"):
        if name in res:
            solves = res[name]["solves"]
            xs, ys = [v["cpu_s"] for v in solves], [v["value"] for v in solves]
            ax.plot(xs, ys, marker=".", label=f"{name}: {res[name]['value']:.3f}")
    plan = res["plan"]
    ax.axhline(plan * 1.02, color="tab:red", ls="--",
               label=f"{plan * 1.02:.1f}: the plan's {plan:.1f} × 1.02")  # fmt: skip
    ax.set_xlabel("CPU seconds")
    ax.set_ylabel("aggregate LP bound (req/s)")
    ax.set_ylim(604.0, 612.0)
    ax.set_title("Per-size packing cuts on the aggregate LP, 64 models / 64 GPUs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="separation rounds at most")
    ap.add_argument("--ipm", action="store_true", help="also with the interior point method")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    table = build_candidates(large_problem(0.7, 100.0, 8.0), Mode.MUX)
    command = " ".join(["python scripts/probe_support_cuts.py", *(argv or sys.argv[1:])])
    plan = json.loads(LARGE.read_text())["large"]["median"]
    res: dict = {"command": command, "plan": plan, "target": plan * 1.02}
    log("DFF cuts alone")
    plain = run(table, ROUNDS, support=False, solver="simplex")
    point = plain.pop("point")
    res["dff"] = plain
    agg = Aggregate(Instance.whole(table))
    res["small_families"] = small_families(agg, point.x, point.meshes)
    log(json.dumps(res["small_families"]))
    for solver in ("simplex", "ipm") if args.ipm else ("simplex",):
        name = f"support_{solver}"
        log(name)
        res[name] = run(table, args.rounds, support=True, solver=solver)
        res[name].pop("point")
    res["load_before"], res["load_after"] = load_before, os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and .png")
    return res


if __name__ == "__main__":
    main()
