from __future__ import annotations

import math

import pytest

from placement.candidates import Mode, build_candidates, fits, mesh_capacity
from tests.helpers.placement import cluster, problem, spec


def test_capacity() -> None:
    p = problem([spec()], [1.0])
    mux, tmp = mesh_capacity(p, Mode.MUX), mesh_capacity(p, Mode.TEMPORAL)
    assert mux.as_tuple() == pytest.approx((p.usable_memory, 0.85, 0.85, 1.1 - 0.3))
    assert tmp.as_tuple() == (p.usable_memory, 0.85, 0.85, 1.0)


def test_a_candidate_serves_its_rate_or_its_capacity() -> None:
    p = problem([spec(hidden=1024, layers=8)], [0.5])
    table = build_candidates(p, Mode.MUX, prune=False)
    for c in table.options(0, 1):
        assert c.served <= 0.5
        assert c.use[3] == c.share  # decode SM admitted
        kv = (c.batch + 2 * math.sqrt(c.batch)) * p.kv_bytes_per_request(0)  # mean + 2 sd
        assert c.use[0] == pytest.approx(p.cost.fixed_bytes(p.specs[0], 1, p.engine) + kv)
        # Little's law: the batch is the served decode tokens per second times the step
        steps = p.targets[0].decode_steps
        assert c.batch == pytest.approx(c.served * steps * c.tpot, rel=1e-6)
        # the decode holds its share while any request decodes: P(busy) = 1 - e^-batch
        assert c.use[1] >= (1 - math.exp(-c.batch)) * c.share - 1e-12
    assert max(c.served for c in table.options(0, 1)) == 0.5


def test_tpot_slo_limits_the_batch() -> None:
    from placement.workload import SLO

    s = spec(hidden=1024, layers=8)
    loose = build_candidates(problem([s], [1000.0], slo=SLO(tpot=10.0)), Mode.MUX)
    tight = build_candidates(problem([s], [1000.0], slo=SLO(tpot=0.004)), Mode.MUX)
    assert max(c.served for c in tight.options(0, 1)) < max(c.served for c in loose.options(0, 1))
    assert all(c.tpot <= 0.004 for c in tight.options(0, 1))


def test_pruning_keeps_only_the_pareto_front() -> None:
    p = problem([spec(hidden=1024, layers=8)], [0.5])
    full = build_candidates(p, Mode.MUX, prune=False).options(0, 1)
    kept = build_candidates(p, Mode.MUX).options(0, 1)
    assert set(kept) <= set(full)

    def beats(k, c) -> bool:
        return k.served >= c.served and all(a <= b for a, b in zip(k.use, c.use, strict=True))

    for c in full:  # every dropped candidate is matched or beaten by a kept one
        assert any(beats(k, c) for k in kept)


def test_temporal_uses_time() -> None:
    p = problem([spec()], [1.0], cluster())
    t = build_candidates(p, Mode.TEMPORAL)
    for c in t.options(0, 1):
        assert c.use[1] == c.use[2] and c.use[3] == 0.0


def test_fits_sums_resources() -> None:
    p = problem([spec(), spec()], [1.0, 1.0])
    table = build_candidates(p, Mode.MUX, prune=False)
    a = max(table.options(0, 1), key=lambda c: c.share)
    assert fits([a], table.capacity)
    assert not fits([a] * 2, table.capacity)  # two decodes at 0.4+ exceed admission 0.8
