from __future__ import annotations

from pathlib import Path

from placement.algorithms import solve
from placement.report import format_comparison, format_placement, plot
from placement.simulator import simulate
from tests.helpers.placement import cluster, problem, spec


def plans(hot: float = 900.0):
    p = problem(
        [spec(), spec(hidden=1024, layers=8)], [2.0, hot], cluster(gpus_per_node=2), output=50
    )
    return p, solve(p, progress=None)


def test_tables() -> None:
    _p, ps = plans()
    text = format_placement(ps["ilp"])
    plan = ps["ilp"]
    assert plan.bound == plan.served_total
    assert text.splitlines()[0].startswith(
        f"== ilp: optimal, gap 0.00%, bound {plan.bound:.2f} req/s, solved in "
    )
    assert "mesh 0: node 0, GPUs " in text
    assert "  model          tp  prefill decode     kv   est req/s / rate\n" in text
    assert "under-served: m1 (" in text
    assert "total: " in text and " req/s requested (" in text
    temporal = format_placement(ps["temporal"])
    assert "    time       " in temporal
    table = format_comparison(ps)
    assert table.splitlines()[0].split() == [
        "algorithm",
        "est",
        "req/s",
        "x",
        "spatial",
        "solve",
        "s",
        "gap",
    ]
    assert [line.split()[0] for line in table.splitlines()[1:]] == [
        "ilp",
        "greedy",
        "muxserve",
        "spatial",
        "temporal",
    ]


def test_simulated_columns_and_plot(tmp_path: Path) -> None:
    p, ps = plans(hot=50.0)
    sims = {n: simulate(pl, p, window_s=3.0, min_warmup_s=1.0) for n, pl in ps.items()}
    text = format_placement(ps["ilp"], sims["ilp"])
    assert "sim req/s" in text and "TTFT p50/p99 ms" in text
    assert "simulated: " in text and "SLO attainment" in text
    assert "sim req/s" in format_comparison(ps, sims)
    out = tmp_path / "p.png"
    plot(ps, sims, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
