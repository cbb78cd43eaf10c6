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
  method without crossover (a point in the middle of the optimal face, which a cut is more
  likely to move).

Private seams, kept inside this script: `cut_bound._Aggregate` (its `solve` is wrapped to
record each LP), and the HiGHS object inside the `lp.Program` that `aggregate` makes (for
`--ipm`). Writes JSON (the command, load average before and after, each variant's solves)
and a PNG of the bounds.

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

from placement import aggregate as ag  # noqa: E402
from placement import cut_bound as cb  # noqa: E402
from placement.candidates import Mode, build_candidates  # noqa: E402
from placement.lp import Program  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "placement" / "support_cuts_probe.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(table: object, rounds: int, support: bool, ipm: bool) -> dict:
    """cut_bound with every LP solve recorded (value, meshes per size, CPU-s since start)."""
    solves: list[dict] = []
    points: list[tuple] = []
    orig_solve, orig_program = cb._Aggregate.solve, ag.Program
    start = time.process_time()

    class IpmProgram(Program):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, **k)  # type: ignore[arg-type]
            h = self._impl.h  # type: ignore[union-attr]
            h.setOptionValue("solver", "ipm")
            h.setOptionValue("run_crossover", "off")

    def solve(self, cuts, backend, deadline):  # type: ignore[no-untyped-def]
        found = orig_solve(self, cuts, backend, deadline)
        if found is not None:
            value, x, meshes = found.value, found.x, found.meshes
            points.append((self, x, meshes))
            cpu = time.process_time() - start
            used = {str(s): m for s, m in meshes.items() if m > 1e-9}
            solves.append({"cuts": len(cuts), "value": value, "cpu_s": cpu, "meshes": used})
            log(f"  LP {len(solves)}: {value:.4f} with {len(cuts)} cuts, "
                f"{solves[-1]['cpu_s']:.1f} CPU-s")  # fmt: skip
        return found

    cb._Aggregate.solve = solve  # type: ignore[method-assign]
    if ipm:
        ag.Program = IpmProgram  # type: ignore[misc]
    try:
        found = cb.cut_bound(table, rounds=rounds, support=support)  # type: ignore[arg-type]
    finally:
        cb._Aggregate.solve = orig_solve  # type: ignore[method-assign]
        ag.Program = orig_program  # type: ignore[misc]
    assert found is not None
    res = {"value": found.value, "rounds": found.rounds, "cuts": found.cuts,
           "cpu_s": time.process_time() - start, "solves": solves}  # fmt: skip
    res["point"] = points[-1]
    return res


def small_families(agg: object, x: dict, meshes: dict) -> dict:
    """Clique and cardinality statistics of each size's support at the point."""
    out = {}
    for s in agg.sizes:  # type: ignore[attr-defined]
        on = np.flatnonzero(x[s] > 1e-9)
        if len(on) == 0:
            continue
        sh, xs = agg.shares[s][on], x[s][on]  # type: ignore[attr-defined]
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
    """Each variant's LP value against CPU seconds (titled PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("dff", "support_simplex", "support_ipm"):
        if name in res:
            solves = res[name]["solves"]
            xs, ys = [v["cpu_s"] for v in solves], [v["value"] for v in solves]
            ax.plot(xs, ys, marker=".", label=f"{name}: {res[name]['value']:.3f}")
    ax.axhline(606.4, color="tab:red", ls="--", label="606.4: a 2 % gap for the plan's 594.6")
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
    res: dict = {"command": command}
    log("DFF cuts alone")
    plain = run(table, cb.ROUNDS, support=False, ipm=False)
    agg, x, meshes = plain.pop("point")
    res["dff"] = plain
    res["small_families"] = small_families(agg, x, meshes)
    log(json.dumps(res["small_families"]))
    for ipm in (False, True) if args.ipm else (False,):
        name = "support_ipm" if ipm else "support_simplex"
        log(name)
        res[name] = run(table, args.rounds, support=True, ipm=ipm)
        res[name].pop("point")
    res["load_before"], res["load_after"] = load_before, os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and .png")
    return res


if __name__ == "__main__":
    main()
