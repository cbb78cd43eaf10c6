from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from placement.candidates import (
    Candidate,
    CandidateTable,
    Capacity,
    Mode,
    build_candidates,
    fits,
)
from placement.cut_bound import cut_bound
from placement.support_cuts import SupportCut, config_bound, separate_support
from tests.helpers.placement import cluster, problem, random_problem, spec
from tests.placement.exhaustive import best_placement
from tests.placement.test_cut_bound import crowded_gpu

CAP = (1.0, 1.0, 1.0, 1.0)


def item(k: int, memory: float, sm: float) -> Candidate:
    return Candidate(k, 1, 0.1, 1.0, 1.0, 0.01, 0.01, 0.0, (memory, sm, 0.0, 0.0))


def worst_config(items: list[Candidate], g: np.ndarray) -> float:
    """Brute force: the largest Σ g over the subsets of `items` that fit one mesh."""
    best = 0.0
    for n in range(1, len(items) + 1):
        for subset in itertools.combinations(range(len(items)), n):
            if fits([items[k] for k in subset], Capacity(*CAP)):
                best = max(best, float(g[list(subset)].sum()))
    return best


def test_three_items_that_fit_two_by_two_need_one_and_a_half_meshes() -> None:
    # any two fit one mesh, all three do not: each resource sums to 1.15, so 1.2 pooled
    # meshes hold them, but a fractional packing needs 1.5 (each pair at 1/2)
    items = [item(0, 0.6, 0.2), item(1, 0.2, 0.6), item(2, 0.35, 0.35)]
    xs = np.ones(3)
    sep = separate_support(items, xs, 1.2, CAP)
    assert sep.g is not None
    assert float(sep.g @ xs) == pytest.approx(1.5, rel=1e-3)
    assert sep.cover_lower == pytest.approx(1.5, rel=1e-3)
    assert sep.cover_upper == pytest.approx(1.5, abs=1e-9)
    assert worst_config(items, sep.g) <= 1.0 + 1e-12
    assert separate_support(items, xs, 1.5, CAP).g is None  # 1.5 meshes do hold them


def test_two_items_of_one_unit_never_share_a_configuration() -> None:
    # both fit one mesh together, but as two candidates of one unit no placement puts them
    # there: they need two meshes, one each, and the cut says so
    items = [item(0, 0.3, 0.3), item(0, 0.4, 0.2)]
    xs = np.ones(2)
    apart = separate_support(items, xs, 1.2, CAP, units=[7, 7])
    assert apart.g is not None and apart.cover_upper == pytest.approx(2.0, abs=1e-9)
    assert float(apart.g @ xs) == pytest.approx(2.0, rel=1e-9)
    together = separate_support(items, xs, 1.2, CAP)  # as two units: one mesh holds both
    assert together.g is None and together.cover_upper == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="2 support items but 1 units"):
        separate_support(items, xs, 1.2, CAP, units=[7])


def test_config_bound_is_the_best_fitting_subset() -> None:
    items = [item(0, 0.6, 0.2), item(1, 0.2, 0.6), item(2, 0.35, 0.35)]
    g = np.array([1.0, 2.0, 4.0])
    assert config_bound(items, g, CAP) == pytest.approx(6.0, rel=1e-4)  # {1, 2}
    assert config_bound(items, g, CAP) >= 6.0
    assert config_bound(items, np.zeros(3), CAP) == 0.0
    assert config_bound(items, g, CAP, units=[0, 1, 1]) == pytest.approx(5.0, rel=1e-4)  # {0, 2}
    # values the pricer leaves out are added back whole
    assert config_bound(items, np.array([1e-10, 2e-10, 4.0]), CAP) == pytest.approx(4.0 + 3e-10)


def spread(table: CandidateTable, size: int, most: int = 9) -> list[Candidate]:
    """At most two candidates of each model, taken round-robin over the models (the first
    candidate of every model, then the second), `most` in all."""
    per_model = [table.options(i, size)[:2] for i in range(table.problem.num_models)]
    firsts = [opts[0] for opts in per_model if opts]
    seconds = [opts[1] for opts in per_model if len(opts) > 1]
    return (firsts + seconds)[:most]


# the first 12 seeds whose random table has candidates of two models or more on some size
# (seeds 1, 2, 6 and 10 have one model per size: nothing to separate)
SEVERAL_MODELS = (0, 3, 4, 5, 7, 8, 9, 11, 12, 13, 14, 16)


@pytest.mark.parametrize("seed", SEVERAL_MODELS)
def test_every_cut_holds_for_every_configuration_of_a_random_table(seed: int) -> None:
    rng = random.Random(seed)
    table = build_candidates(random_problem(rng), Mode.MUX)
    cap = table.capacity.as_tuple()
    size = max(table.problem.mesh_sizes, key=lambda s: len({c.model for c in spread(table, s)}))
    items = spread(table, size)
    assert len({c.model for c in items}) >= 2
    units = [c.model for c in items]  # replica 0 of each model: one unit per model
    xs = np.array([rng.uniform(0.2, 1.0) for _ in items])
    for meshes in (0.2, 0.5, 1.0):
        g = separate_support(items, xs, meshes, cap, units=units).g
        if g is None:
            continue
        assert float(g @ xs) > meshes
        best = 0.0
        for n in range(1, len(items) + 1):
            for subset in itertools.combinations(range(len(items)), n):
                chosen = [items[k] for k in subset]
                if len({c.model for c in chosen}) == n and table.fits(chosen):
                    best = max(best, float(g[list(subset)].sum()))
        assert best <= 1.0 + 1e-12


def test_the_random_tables_give_candidates_of_several_models() -> None:
    # the test above is about several models: the first candidates were all model 0's
    table = build_candidates(random_problem(random.Random(0)), Mode.MUX)
    items = spread(table, table.problem.mesh_sizes[0])
    assert len({c.model for c in items}) >= 3
    assert max(sum(c.model == i for c in items) for i in {c.model for c in items}) <= 2


@pytest.mark.parametrize("seed", range(8))
def test_the_bound_with_support_cuts_is_at_least_the_optimum(seed: int) -> None:
    p = random_problem(random.Random(seed))
    exact = best_placement(p, build_candidates(p, Mode.MUX, prune=False))
    if exact == float("-inf"):
        pytest.skip("no placement holds every model")
    table = build_candidates(p, Mode.MUX)
    with_support, without = cut_bound(table, support=True), cut_bound(table)
    assert with_support is not None and without is not None
    assert exact - 1e-7 <= with_support.value <= without.value + 1e-9


def three_on_one_gpu() -> CandidateTable:
    """Three models on one GPU, each at 50, 45 or 6 % of its memory serving 1 req/s, or at
    0.1 % serving 0.1: any two fit large, all three do not (1.01), so the optimum is
    2 × 1 + 0.1 = 2.1. Every DFF cut holds at the LP's 2.98 (no weight mix or function of the
    family makes 0.5, 0.45 and 0.06 count more than 1 together), the support cut does not."""
    p = problem([spec(f"m{i}") for i in range(3)], [1.0] * 3, cluster(nodes=1, gpus_per_node=1))

    def cand(i: int, memory: float, served: float) -> Candidate:
        return Candidate(i, 1, 0.1, served, 1.0, 0.01, 0.01, 0.0, (memory, 0.0, 0.0, 0.0))

    options = {
        (i, 1): (cand(i, m, 1.0), cand(i, 0.001, 0.1)) for i, m in enumerate((0.5, 0.45, 0.06))
    }
    return CandidateTable(p, Mode.MUX, Capacity(1.0, 1.0, 1.0, 1.0), options)


def test_support_cuts_lower_the_bound_to_the_optimum_where_no_dff_cut_holds() -> None:
    table = three_on_one_gpu()
    exact = best_placement(table.problem, table)
    assert exact == pytest.approx(2.1, abs=1e-12)
    without, rounds = cut_bound(table), []
    with_support = cut_bound(table, support=True, on_round=rounds.append)
    assert without is not None and with_support is not None
    assert without.value == pytest.approx(2.98196393, abs=1e-6) and without.rounds == 0
    assert with_support.value == pytest.approx(2.1, abs=1e-7)
    assert with_support.value >= exact - 1e-9
    assert (with_support.rounds, with_support.cuts) == (1, without.cuts + 1)
    first = rounds[0].support[1]  # the first LP's support needs more than its one mesh
    assert first.g is not None and first.cover_lower > 1.0 + 1e-6
    assert [r.added for r in rounds] == [1, 0]


def test_the_crowded_gpu_keeps_its_exact_bound() -> None:
    found = cut_bound(crowded_gpu(), support=True)
    assert found is not None and found.value == pytest.approx(4.2, abs=1e-6)


def test_a_support_cut_refuses_a_size_of_another_length() -> None:
    cut = SupportCut(4, (0.5, 0.5))
    assert cut.values(np.zeros((2, 4))).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="size 4 has 2 coefficients, the size has 3"):
        cut.values(np.zeros((3, 4)))
