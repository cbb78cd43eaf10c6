"""PNG plots of benchmark results: latency CDFs, and metrics (SLO attainment) against rate.

matplotlib is optional (`pip install muxserve[plot]`); it is imported only here, on use.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from muxserve.bench.client import RequestRecord
from muxserve.bench.metrics import tpot

Points = Sequence[tuple[float, float | None]]
METRICS = {
    "TTFT (ms)": lambda r: r.ttft,
    "TPOT (ms)": tpot,
    "E2E latency (ms)": lambda r: r.latency,
}


class MissingPlotsError(RuntimeError):
    """matplotlib is not installed."""


def _plain_ticks(axis: Any) -> None:
    """Label a log axis 2, 5, 10, 200 rather than 2 x 10^0."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise MissingPlotsError("plots need matplotlib: pip install 'muxserve[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(
    rows: Mapping[str, Mapping[str, Sequence[RequestRecord]]], path: str | Path, title: str
) -> None:
    """A grid of CDFs: one row per key of `rows` (e.g. a model), one column per metric
    (TTFT, TPOT, E2E), one line per series within the row (e.g. a mode, or a model)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(rows), len(METRICS), figsize=(4.2 * len(METRICS), 3.0 * len(rows)), squeeze=False
    )
    for axrow, (row_name, series) in zip(axes, rows.items(), strict=True):
        for ax, (metric, fn) in zip(axrow, METRICS.items(), strict=True):
            for label, records in series.items():
                xs = sorted(v * 1000 for r in records if r.success and (v := fn(r)) is not None)
                if xs:
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
            ax.set_xscale("log")
            _plain_ticks(ax.xaxis)
            ax.set_xlabel(metric)
            ax.set_ylim(0, 1.02)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{row_name}: {metric.split(' (')[0]}", fontsize=10)
        axrow[0].set_ylabel("fraction of requests")
        axrow[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_rate(
    panels: Mapping[str, Mapping[str, Points]],
    path: str | Path,
    title: str,
    log_panels: Collection[str] = (),
) -> None:
    """One panel per metric (e.g. "SLO attainment"), one line per series, rate on x."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for label, points in series.items():
            pts = sorted((x, y) for x, y in points if y is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        if name in log_panels:
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis)
        if "attainment" in name:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
