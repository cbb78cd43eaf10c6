"""What `muxserve plan` prints: a table per mesh, the totals, and an optional PNG plot.

matplotlib is imported only when a plot is asked for; it is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from muxserve.errors import ConfigError
from placement.candidates import Mode
from placement.plan import Placement
from placement.simulator import ModelResult, SimResult


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _gpus(ids: tuple[int, ...]) -> str:
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"


def format_placement(plan: Placement, sim: SimResult | None = None) -> str:
    """Per mesh: GPUs, models, TP degree, SM shares, KV share, estimated vs requested rate."""
    gap = "" if plan.gap is None else f", gap {plan.gap:.2%}"
    bound = "" if plan.bound is None else f", bound {plan.bound:.2f} req/s"
    lines = [
        f"== {plan.algorithm}: {plan.status}{gap}{bound}, solved in {plan.solve_time_s:.2f} s =="
    ]
    lines += [f"note: {n}" for n in plan.notes]
    stats = {m.name: m for m in sim.models} if sim else {}
    share_head = "prefill decode" if plan.mode is Mode.MUX else "  time       "
    head = f"  {'model':<14}{'tp':>3}  {share_head}{'kv':>7}  {'est req/s':>10} / {'rate':<7}"
    if sim:
        head += f"{'sim req/s':>10}{'SLO':>7}  {'TTFT p50/p99 ms':>16}  {'TPOT p50/p99 ms':>16}"
    for k, mesh in enumerate(plan.meshes):
        lines.append(f"mesh {k}: node {mesh.node}, GPUs {_gpus(mesh.gpus)} ({mesh.size})")
        lines.append(head)
        for m in mesh.models:
            if plan.mode is Mode.MUX:
                shares = f"{m.prefill_share:>7.2f}{m.decode_share:>7.2f}"
            else:
                shares = f"{m.time_share or 1.0:>7.2f}       "
            name = m.name if len(plan.replicas(m.name)) == 1 else f"{m.name} r{m.replica}"
            row = (
                f"  {name:<14}{m.tensor_parallel:>3}  {shares}{m.kv_share:>7.2f}  "
                f"{m.served:>10.2f} / {m.rate:<7.2f}"
            )
            if m.name in stats and m.replica == 0:
                row += _sim_cells(stats[m.name])  # over all its replicas
            lines.append(row)
    lines.append(
        f"total: {plan.served_total:.2f} of {plan.requested_total:.2f} req/s requested "
        f"({plan.served_total / plan.requested_total:.1%}) on {plan.gpus_used} GPUs"
    )
    spread = {m.name: len(plan.replicas(m.name)) for m in plan.models if m.replica > 0}
    if spread:
        lines.append("replicas: " + ", ".join(f"{n} on {k} meshes" for n, k in spread.items()))
    short = plan.under_served()
    if short:
        names = ", ".join(f"{m.name} ({m.served:.2f} of {m.rate:.2f})" for m in short)
        lines.append(f"under-served: {names}")
    if sim:
        lines.append(
            f"simulated: {sim.throughput:.2f} req/s, SLO attainment {sim.slo_attainment:.1%} "
            f"over {sim.window_s:.0f} s"
        )
    return "\n".join(line.rstrip() for line in lines)


def _sim_cells(s: ModelResult) -> str:
    ttft = f"{_ms(s.ttft_p50)}/{_ms(s.ttft_p99)}"
    tpot = f"{_ms(s.tpot_p50)}/{_ms(s.tpot_p99)}"
    return f"{s.throughput:>10.2f}{s.slo_attainment:>7.1%}  {ttft:>16}  {tpot:>16}"


def format_comparison(
    plans: Mapping[str, Placement], sims: Mapping[str, SimResult] | None = None
) -> str:
    """One line per algorithm: estimated (and simulated) throughput, ratio to spatial, time."""
    base = plans.get("spatial")
    lines = [f"{'algorithm':<10}{'est req/s':>11}{'x spatial':>11}{'solve s':>9}{'gap':>8}"]
    if sims:
        lines[0] += f"{'sim req/s':>11}{'SLO':>8}"
    for name, plan in plans.items():
        ratio = f"{plan.served_total / base.served_total:.2f}" if base else "-"
        gap = "-" if plan.gap is None else f"{plan.gap:.2%}"
        row = f"{name:<10}{plan.served_total:>11.2f}{ratio:>11}{plan.solve_time_s:>9.2f}{gap:>8}"
        if sims and name in sims:
            row += f"{sims[name].throughput:>11.2f}{sims[name].slo_attainment:>8.1%}"
        lines.append(row)
    return "\n".join(lines)


def plot(
    plans: Mapping[str, Placement], sims: Mapping[str, SimResult] | None, path: str | Path
) -> None:
    """Bar charts of throughput (estimated and simulated) and SLO attainment per algorithm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from e
    names = list(plans)
    fig, axes = plt.subplots(1, 2 if sims else 1, figsize=(10 if sims else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    xs = range(len(names))
    width = 0.4 if sims else 0.8
    ax.bar(
        [x - (width / 2 if sims else 0) for x in xs],
        [plans[n].served_total for n in names],
        width,
        label="estimated",
    )
    if sims:
        ax.bar(
            [x + width / 2 for x in xs],
            [sims[n].throughput for n in names],
            width,
            label="simulated",
        )
        ax.legend()
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("throughput (req/s)")
    if sims:
        ax2 = axes[0][1]
        ax2.bar(list(xs), [sims[n].slo_attainment * 100 for n in names], 0.6)
        ax2.set_xticks(list(xs), names)
        ax2.set_ylabel("SLO attainment (%)")
        ax2.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
