from __future__ import annotations

from types import SimpleNamespace

import pytest

from muxserve.models.hf_config import load_hf_config
from placement.authors import (
    DECODE_SHARES,
    Estimator,
    _place,
    authors_estimate,
    search,
    solve_muxserve,
)
from placement.candidates import Mode, build_candidates
from placement.problem import Problem
from placement.specs import spec_from_config
from tests.helpers.placement import CONFIGS, cluster, problem, spec


class RateMean:
    """A stand-in for the authors' mesh estimator: every model serves its rate, so a mesh's
    score is Σ rate² / Σ rate (the rate-weighted mean of throughputs equal to the rates)."""

    def __init__(self, rates: list[float], weight_bytes: int = 1 << 20) -> None:
        self.p = SimpleNamespace(
            specs=[SimpleNamespace(weight_bytes=weight_bytes) for _ in rates],
            targets=[SimpleNamespace(rate=r) for r in rates],
            cluster=SimpleNamespace(gpu=SimpleNamespace(memory_bytes=80 << 30)),
        )

    def size_factor(self, i: int) -> int:
        return 1

    def mesh(self, size: int, models: list[tuple[int, float]]) -> tuple[float, tuple[float, ...]]:
        rates = [self.p.targets[i].rate for i, _ in models]
        return sum(r * r for r in rates) / sum(rates), tuple(rates)


@pytest.mark.parametrize(("fixed", "expected"), [(True, [[0], [1]]), (False, [[0, 1], []])])
def test_the_index_bug_credits_a_model_against_another_meshs_score(fixed, expected) -> None:
    # A (rate 10) opens mesh 0, which then sorts after the empty mesh 1. Fixed: B gains 5 on
    # mesh 1 and (100 + 25) / 15 - 10 = -1.67 beside A, so it takes mesh 1. With the bug,
    # mesh 1 (now first in the list) is credited against A's 10 (the first position's
    # score): 5 - 10 = -5, and mesh 0 against 0: 8.33, so B joins A.
    est = RateMean([10.0, 5.0])
    share = {(0, 1): 0.3, (1, 1): 0.3}
    meshes = _place(est, share, [0, 1], [1, 1], fix_index_bug=fixed)  # type: ignore[arg-type]
    assert meshes is not None
    assert [[i for i, _ in m.models] for m in meshes] == expected
    assert [m.remaining for m in meshes] == pytest.approx([1 - 0.3 * len(e) for e in expected])


def test_decode_shares_may_overload_by_twenty_percent_and_memory_holds_weights() -> None:
    est = RateMean([4.0, 3.0, 2.0])
    share = {(i, 1): 0.6 for i in range(3)}
    meshes = _place(est, share, [0, 1, 2], [1], fix_index_bug=True)  # type: ignore[arg-type]
    assert meshes is None  # 0.6 + 0.6 = 1.2 fits, a third 0.6 does not
    meshes = _place(est, share, [0, 1], [1], fix_index_bug=True)  # type: ignore[arg-type]
    assert meshes is not None and meshes[0].remaining == pytest.approx(-0.2)
    big = RateMean([4.0], weight_bytes=44 << 30)  # more than 0.9 x 60 % of 80 GiB
    assert _place(big, {(0, 1): 0.3}, [0], [1], fix_index_bug=True) is None  # type: ignore[arg-type]


def test_size_factor_is_the_parameter_count_over_7b_as_a_power_of_two() -> None:
    specs = []
    for k in ("7b", "13b", "30b", "65b"):
        path = CONFIGS / "models" / f"llama-{k}"
        specs.append(spec_from_config(k, str(path), load_hf_config(path)))
    est = Estimator.__new__(Estimator)
    est.p = SimpleNamespace(specs=specs)  # type: ignore[assignment]
    assert [est.size_factor(i) for i in range(4)] == [1, 2, 4, 8]


def test_decode_share_is_the_least_that_meets_the_rate_else_the_most_throughput() -> None:
    p = problem([spec(hidden=512, layers=4)] * 2, [0.01, 1e6], cluster(nodes=1, gpus_per_node=1))
    est = Estimator(p)
    assert est.decode_share(0, 1) == DECODE_SHARES[0]  # 0.3 meets 0.01 req/s
    tpts = {s: est.alone(1, 1, s)[1] for s in DECODE_SHARES}
    assert est.decode_share(1, 1) == max(tpts, key=lambda s: (tpts[s], -s))
    assert not est.alone(1, 1, 0.9)[0]


def test_places_the_paper_workload(paper_problem: Problem) -> None:
    table = build_candidates(paper_problem, Mode.MUX)
    fixed = solve_muxserve(paper_problem, table)
    buggy = solve_muxserve(paper_problem, table, fix_index_bug=False)
    for plan in (fixed, buggy):
        names = sorted(m.name for m in plan.models)
        assert names == sorted(s.name for s in paper_problem.specs)  # each model once
        assert plan.algorithm == "muxserve" and plan.status == "heuristic"
        assert authors_estimate(paper_problem, plan) > 0
    # fixing the bug raises the algorithm's own estimate (issue 14: by 1-9 %)
    assert search(paper_problem).score > search(paper_problem, fix_index_bug=False).score
    assert "index bug fixed" in fixed.notes and any("kept" in n for n in buggy.notes)
