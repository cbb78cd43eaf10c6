"""Tables for the terminal and the results file of `muxserve bench`."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    ("model", 14),
    ("sent", 6),
    ("ok", 6),
    ("req/s", 7),
    ("tok/s", 8),
    ("TTFT p50", 9),
    ("TTFT p99", 9),
    ("TPOT p50", 9),
    ("TPOT p99", 9),
    ("ITL p99", 8),
    ("E2E p99", 9),
    ("SLO att", 8),
)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per model and one for all of them, in COLUMNS order (latencies in ms)."""
    rows = []
    groups = [*summary["models"].items(), ("all", summary["overall"])]
    for name, g in groups:
        att = g["slo_attainment"]
        rows.append(
            [
                name,
                str(g["requests"]),
                str(g["completed"]),
                f"{g['request_throughput']:.2f}",
                f"{g['output_throughput']:.0f}",
                _ms(g["ttft_ms"]["p50"]),
                _ms(g["ttft_ms"]["p99"]),
                _ms(g["tpot_ms"]["p50"]),
                _ms(g["tpot_ms"]["p99"]),
                _ms(g["itl_ms"]["p99"]),
                _ms(g["e2el_ms"]["p99"]),
                "-" if att is None else f"{att:.1%}",
            ]
        )
    return rows


def format_table(
    rows: Sequence[Sequence[str]], columns: Sequence[tuple[str, int]] = COLUMNS
) -> str:
    """Right-aligned columns under a header line."""
    lines = ["".join(f"{h:>{w}}" for h, w in columns)]
    lines += ["".join(f"{c:>{w}}" for c, (_, w) in zip(row, columns, strict=True)) for row in rows]
    return "\n".join(lines)


def format_run(run: dict[str, Any]) -> str:
    """A run's heading (rate, duration, load), its table, and its most common errors."""
    rate = "as recorded" if run["rate"] is None else f"{run['rate']:g} req/s"
    load = ", ".join(f"{x:.2f}" for x in run["load_avg"])
    head = (
        f"rate {rate}: {run['sent']}/{run['trace_requests']} sent in {run['duration_s']:.1f}s"
        f"{'' if run['stopped'] is None else ' (stopped: ' + run['stopped'] + ')'}"
        f"; load average {load}"
    )
    parts = [head, format_table(summary_rows(run["summary"]))]
    parts += [f"  {n} x {msg}" for msg, n in run["errors"].items()]
    return "\n".join(parts)


def machine() -> dict[str, Any]:
    """Where the numbers were taken."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` atomically (a reader never sees half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(p)
