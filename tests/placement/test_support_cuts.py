from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from placement.candidates import Candidate, Capacity, Mode, build_candidates, fits
from placement.cut_bound import cut_bound
from placement.support_cuts import SupportCut, config_bound, separate_support
from tests.helpers.placement import random_problem
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
    g = separate_support(items, xs, 1.2, CAP)
    assert g is not None
    assert float(g @ xs) == pytest.approx(1.5, rel=1e-3)
    assert worst_config(items, g) <= 1.0 + 1e-12
    assert separate_support(items, xs, 1.5, CAP) is None  # 1.5 meshes do hold them


def test_config_bound_is_the_best_fitting_subset() -> None:
    items = [item(0, 0.6, 0.2), item(1, 0.2, 0.6), item(2, 0.35, 0.35)]
    g = np.array([1.0, 2.0, 4.0])
    assert config_bound(items, g, CAP) == pytest.approx(6.0, rel=3e-4)  # {1, 2}
    assert config_bound(items, g, CAP) >= 6.0
    assert config_bound(items, np.zeros(3), CAP) == 0.0


@pytest.mark.parametrize("seed", range(12))
def test_every_cut_holds_for_every_configuration_of_a_random_table(seed: int) -> None:
    rng = random.Random(seed)
    table = build_candidates(random_problem(rng), Mode.MUX)
    cap = table.capacity.as_tuple()
    size = table.problem.mesh_sizes[0]
    items = [c for i in range(table.problem.num_models) for c in table.options(i, size)][:9]
    if len(items) < 2:
        pytest.skip("too few candidates")
    xs = np.array([rng.uniform(0.2, 1.0) for _ in items])
    for meshes in (0.2, 0.5, 1.0):
        g = separate_support(items, xs, meshes, cap)
        if g is None:
            continue
        assert float(g @ xs) > meshes
        best = 0.0
        for n in range(1, len(items) + 1):
            for subset in itertools.combinations(range(len(items)), n):
                if table.fits([items[k] for k in subset]):
                    best = max(best, float(g[list(subset)].sum()))
        assert best <= 1.0 + 1e-12


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


def test_the_crowded_gpu_keeps_its_exact_bound() -> None:
    found = cut_bound(crowded_gpu(), support=True)
    assert found is not None and found.value == pytest.approx(4.2, abs=1e-6)


def test_a_support_cut_refuses_a_size_of_another_length() -> None:
    cut = SupportCut(4, (0.5, 0.5))
    assert cut.values(np.zeros((2, 4))).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="size 4 has 2 coefficients, the size has 3"):
        cut.values(np.zeros((3, 4)))
