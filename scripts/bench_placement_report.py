"""Tables and plot of `scripts/bench_placement.py`'s results (bench.json -> bench.md, bench.png).

Kept apart from the runs so that `--from-json` redraws them, and so that which estimator the
simulation sides with is computed in one place for the log, the JSON and the tables.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from placement.algorithms import ALGORITHMS

PAPER_MAX_RATE = 40.0  # the paper's generator: model i gets 40 × (i + 1)^-α req/s


PLANS = ("ilp", "greedy", "muxserve", "spatial")


def sides_with(row: dict) -> dict:
    """Which estimator the simulation (first --contention mode) agrees with on this instance.

    First by order: of the pairs of plans whose simulated throughputs differ by over 1 %,
    how many each estimator orders as the simulation does (the choice a planner makes). On a
    tie, by distance: each co-locating plan's throughput relative to spatial's (one model per
    mesh: nothing co-located to disagree about), the mean |log| distance of the estimator's
    ratio from the simulated one.
    """
    have = [n for n in PLANS if "simulated" in row[n] and "authors_est" in row[n]]
    if "spatial" not in have or len(have) < 2:
        return {}
    key = {"ours": "estimated", "theirs": "authors_est"}
    agree = dict.fromkeys(key, 0)
    pairs = 0
    for i, a in enumerate(have):
        for b in have[i + 1 :]:
            sim = row[a]["simulated"] / row[b]["simulated"]
            if abs(math.log(sim)) < math.log(1.01):
                continue  # the simulation cannot tell them apart
            pairs += 1
            for who, k in key.items():
                agree[who] += (row[a][k] > row[b][k]) == (sim > 1)
    base = row["spatial"]
    dist: dict[str, float] = {}
    for who, k in key.items():
        dist[who] = statistics.mean(
            abs(math.log(row[n][k] / base[k] / (row[n]["simulated"] / base["simulated"])))
            for n in have
            if n != "spatial"
        )
    if agree["ours"] != agree["theirs"]:
        side, by = max(agree, key=lambda w: agree[w]), "order"
    else:
        side, by = min(dist, key=lambda w: dist[w]), "distance"
    return {"pairs": pairs, "agree": agree, "distance": dist, "sides_with": side, "by": by}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["paper"]
    scales = sorted({r["scale"] for r in rows})
    fig, axes = plt.subplots(len(scales) + 1, 2, figsize=(12, 3.4 * (len(scales) + 1)),
                             squeeze=False)  # fmt: skip
    for k, scale in enumerate(scales):
        rs = [r for r in rows if r["scale"] == scale]
        alphas = [r["alpha"] for r in rs]
        ax_t, ax_s = axes[k]
        for name in ALGORITHMS:
            (line,) = ax_t.plot(alphas, [r[name]["estimated"] for r in rs], "o-", label=name)
            if name in ("ilp", "greedy", "muxserve"):
                ax_t.plot(alphas, [r[name]["authors_est"] for r in rs], "+:", ms=9,
                          color=line.get_color())  # fmt: skip
            if "simulated" in rs[0][name]:
                ax_t.plot(alphas, [r[name]["simulated"] for r in rs], "x--", color=line.get_color())
                if "simulated_none" in rs[0][name]:
                    ax_t.plot(alphas, [r[name]["simulated_none"] for r in rs], "1", ms=8,
                              color=line.get_color())  # fmt: skip
                ax_s.plot(alphas, [100 * r[name]["slo_attainment"] for r in rs], "o-",
                          color=line.get_color(), label=name)  # fmt: skip
        ax_t.plot(alphas, [r["ilp"]["bound"] for r in rs], "k_", ms=12, label="ILP bound")
        ax_t.plot(alphas, [r["requested"] for r in rs], "k:", label="requested")
        ax_t.set_title(f"max rate {PAPER_MAX_RATE * scale:g} req/s: o ours, + authors' "
                       "estimator, x simulated (Y: no contention)", fontsize=9)  # fmt: skip
        ax_t.set_xlabel("α")
        ax_t.set_ylabel("req/s")
        ax_t.legend(fontsize=7)
        ax_s.set_title("SLO attainment (%, simulated)")
        ax_s.set_xlabel("α")
        ax_s.set_ylim(0, 105)
        ax_s.legend(fontsize=7)
    ax_l, ax_r = axes[-1]
    if "large" in result:
        _large_panel(ax_l, result["large"])
    if "replicas" in result:
        rep = result["replicas"]
        keys = [k for k in rep if k.startswith("replicas_")]
        ax_r.bar([k.replace("_", " ≤ ") for k in keys], [rep[k]["estimated"] for k in keys],
                 0.4, label="estimated")  # fmt: skip
        if "simulated" in rep[keys[0]]:
            ax_r.plot(range(len(keys)), [rep[k]["simulated"] for k in keys], "kx", ms=10,
                      label="simulated")  # fmt: skip
        ax_r.axhline(rep["requested"], color="k", ls=":", label="requested")
        ax_r.set_title(f"one hot model (llm-0 at {rep['hot_rate']:g} req/s): replicas")
        ax_r.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _large_panel(ax: Any, large: dict) -> None:
    """The 64 x 64 runs: each run's plan and bound, the greedy, and the 2 % target line."""
    runs = large["runs"]
    xs = range(1, len(runs) + 1)
    ax.bar([x - 0.2 for x in xs], [r["estimated"] for r in runs], 0.4, label="ILP plan")
    ax.bar([x + 0.2 for x in xs], [r["bound"] for r in runs], 0.4, label="bound")
    ax.plot(xs, [r["greedy"] for r in runs], "k*", label="greedy")
    target = min(r["bound"] for r in runs) / 1.02
    ax.axhline(target, color="k", ls="--", lw=0.8, label="2 % below the bound")
    low = min(min(r["greedy"] for r in runs), min(r["estimated"] for r in runs))
    ax.set_ylim(0.95 * low, 1.01 * max(r["bound"] for r in runs))
    for x, r in zip(xs, runs, strict=True):
        ax.annotate(f"{r['estimated']:.1f}\ngap {r['gap']:.2%}", (x - 0.2, r["estimated"]),
                    xytext=(0, -3), textcoords="offset points", ha="center", va="top",
                    color="white", fontsize=7)  # fmt: skip
    ax.set_title(f"{large['models']} models x {large['gpus']} GPUs, α {large['alpha']:g}, max "
                 f"rate {large['max_rate']:g} req/s, limit {large['time_limit_s']:g} s: "
                 "plan and bound per run", fontsize=9)  # fmt: skip
    ax.set_xlabel("run")
    ax.set_ylabel("req/s")
    ax.set_xticks(list(xs))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4)


def plot_large(result: dict, path: Path) -> None:
    """large.png: the 64 x 64 runs alone (`--large-only`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    _large_panel(ax, result["large"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The paper rows, the warm start and the 64 x 64 runs as markdown tables."""

    def est(r: dict, name: str) -> str:
        x = r[name]
        parts = [f"{x['estimated']:.1f}", f"{x['authors_est']:.1f}" if "authors_est" in x else "-"]
        if "authors_own" in x:
            parts[1] += f" ({x['authors_own']:.1f})"
        parts.append(f"{x['simulated']:.1f}" if "simulated" in x else "-")
        if "simulated_none" in x:
            parts.append(f"{x['simulated_none']:.1f}")
        return " / ".join(parts)

    def ratio(r: dict, key: str) -> str:
        a, b = r["ilp"].get(key), r["muxserve"].get(key)
        return f"{a / b:.2f}" if a and b else "-"

    out = [
        "| max rate | α | requested | ILP | bound (gap) | greedy | muxserve | spatial "
        "| ILP × muxserve (ours / theirs / sim) | SLO ILP / muxserve / spatial "
        "| ILP time, status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("paper", []):
        slo = " / ".join(f"{100 * r[n]['slo_attainment']:.0f}%" if "slo_attainment" in r[n]
                         else "-" for n in ("ilp", "muxserve", "spatial"))  # fmt: skip
        out.append(
            f"| {PAPER_MAX_RATE * r['scale']:g} | {r['alpha']} | {r['requested']:.1f} "
            f"| {est(r, 'ilp')} | {r['ilp']['bound']:.1f} ({r['ilp']['gap']:.2%}) "
            f"| {est(r, 'greedy')} | {est(r, 'muxserve')} | {est(r, 'spatial')} "
            f"| {ratio(r, 'estimated')} / {ratio(r, 'authors_est')} / {ratio(r, 'simulated')} "
            f"| {slo} | {r['ilp']['solve_s']:.2f} s, {r['ilp']['status']} |"
        )
    out += interference(result)
    if "warm_start" in result:
        out += ["", "| max rate | α | table + greedy, CPU s (min-max) | of which the table "
                "| wall s | load |", "|---|---|---|---|---|---|"]  # fmt: skip
        for w in result["warm_start"]:
            lo, hi = w["cpu_min_max"]
            out.append(f"| {PAPER_MAX_RATE * w['scale']:g} | {w['alpha']} | {w['cpu_s']:.3f} "
                       f"({lo:.3f}-{hi:.3f}) | {w['table_cpu_s']:.3f} | {w['wall_s']:.3f} "
                       f"| {w['load']:.1f} |")  # fmt: skip
    if "large" in result:
        out += ["", "| run | ILP | bound | gap | wall s | CPU s | load before-after | greedy "
                "| notes |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k, r in enumerate(result["large"]["runs"]):
            out.append(f"| {k + 1} | {r['estimated']:.1f} | {r['bound']:.1f} | {r['gap']:.2%} "
                       f"| {r['wall_s']:.1f} | {r.get('cpu_s', float('nan')):.1f} "
                       f"| {r['load_before']:.1f}-{r['load_after']:.1f} | {r['greedy']:.1f} "
                       f"| {'; '.join(r['notes'])} |")  # fmt: skip
    return "\n".join(out) + "\n"


def interference(result: dict) -> list[str]:
    """Per instance: each co-locating plan against spatial under both estimators and in
    simulation, with and without contention, and which estimator the simulation sides with
    (recomputed from the rows, so `--from-json` redraws it)."""
    rows = [(r, sides_with(r)) for r in result.get("paper", [])]
    rows = [(r, s) for r, s in rows if s]
    if not rows:
        return []

    def x(r: dict, name: str) -> str:
        a, b = r[name], r["spatial"]
        keys = ("estimated", "authors_est", "simulated", "simulated_none")
        return " / ".join(f"{a[k] / b[k]:.2f}" if k in a and k in b else "-" for k in keys)

    def cost(r: dict, name: str) -> str:
        a = r[name]
        return f"{a['simulated'] / a['simulated_none']:.3f}" if "simulated_none" in a else "-"

    out = ["", "| max rate | α | ILP ÷ spatial (ours / theirs / sim / sim, no contention) "
           "| greedy ÷ spatial | muxserve ÷ spatial | contention's cost: sim ÷ sim without "
           "(ILP / greedy / muxserve) | pairs ordered as simulated: ours / theirs "
           "| distance to sim: ours / theirs | sides with |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r, s in rows:
        out.append(f"| {PAPER_MAX_RATE * r['scale']:g} | {r['alpha']} | {x(r, 'ilp')} "
                   f"| {x(r, 'greedy')} | {x(r, 'muxserve')} "
                   f"| {cost(r, 'ilp')} / {cost(r, 'greedy')} / {cost(r, 'muxserve')} "
                   f"| {s['agree']['ours']}/{s['pairs']} / {s['agree']['theirs']}/{s['pairs']} "
                   f"| {s['distance']['ours']:.3f} / {s['distance']['theirs']:.3f} "
                   f"| {s['sides_with']} (by {s['by']}) |")  # fmt: skip
    return out
