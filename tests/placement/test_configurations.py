from __future__ import annotations

import itertools
import random

import pytest

from placement.candidates import Mode, build_candidates
from placement.configurations import price, price_mip
from tests.helpers.placement import cluster, problem, spec


def brute_force(options, model_price, capacity):
    by_model: dict[int, list] = {}
    for c in options:
        by_model.setdefault(c.model, []).append(c)
    best = 0.0
    for combo in itertools.product(*[[None, *cs] for cs in by_model.values()]):
        chosen = [c for c in combo if c is not None]
        use = [sum(c.use[r] for c in chosen) for r in range(4)]
        if all(u <= cap * (1 + 1e-9) + 1e-9 for u, cap in zip(use, capacity, strict=True)):
            best = max(best, sum(c.served - model_price[c.model] for c in chosen))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_pricing_is_exact(seed: int) -> None:
    rng = random.Random(seed)
    specs = [spec(hidden=rng.choice([512, 1024]), layers=rng.choice([4, 8, 16])) for _ in range(4)]
    p = problem(specs, [rng.uniform(1, 200) for _ in specs], cluster(nodes=1, gpus_per_node=2))
    table = build_candidates(p, Mode.MUX)
    model_price = [rng.uniform(0, 50) for _ in specs]
    cap = table.capacity.as_tuple()
    for size in (1, 2):
        options = [c for i in range(len(specs)) for c in table.options(i, size)]
        want = brute_force(options, model_price, cap)
        got = price(size, options, model_price, cap)
        assert got.exact
        assert (got.configs[0][0] if got.configs else 0.0) == pytest.approx(want)
        assert got.upper >= want - 1e-9
        mip = price_mip(size, options, model_price, cap, 0.0, 10.0)
        assert (mip.configs[0][0] if mip.configs else 0.0) == pytest.approx(want, rel=1e-6)
        for value, cfg in got.configs:  # every configuration found fits and is worth its value
            assert table.fits(cfg.cands)
            assert value == pytest.approx(sum(c.served - model_price[c.model] for c in cfg.cands))


def test_threshold_filters() -> None:
    p = problem([spec()], [10.0])
    table = build_candidates(p, Mode.MUX)
    opts = list(table.options(0, 1))
    assert price(1, opts, [0.0], table.capacity.as_tuple(), threshold=1e9).configs == []
