from __future__ import annotations

import pytest

from muxserve.errors import ConfigError
from placement.baselines import solve_spatial
from tests.helpers.placement import cluster, problem, spec


def test_each_model_gets_its_own_mesh_and_spare_gpus_go_to_the_busiest() -> None:
    p = problem([spec(hidden=1024, layers=8), spec()], [400.0, 1.0], cluster(gpus_per_node=4))
    plan = solve_spatial(p)
    assert [len(m.models) for m in plan.meshes] == [1, 1]
    sizes = {m.models[0].name: m.size for m in plan.meshes}
    assert sizes["m1"] == 1  # served in full on one GPU
    assert sizes["m0"] == 2  # the third GPU cannot join a mesh of 2: meshes are 1, 2, 4, 8
    assert plan.served()["m1"] == 1.0


def test_too_many_models() -> None:
    p = problem([spec()] * 3, [1.0] * 3, cluster(nodes=1, gpus_per_node=2))
    with pytest.raises(ConfigError, match="spatial: the 3 models need at least 3 GPUs"):
        solve_spatial(p)
