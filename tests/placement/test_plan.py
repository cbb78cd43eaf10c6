from __future__ import annotations

from pathlib import Path

from conftest import CONFIGS, cluster, problem, spec

from muxserve.config import dump_config, load_config
from placement.greedy import solve_greedy
from placement.plan import to_config
from placement.problem import load_problem


def test_plan_round_trips_as_a_serving_config(tmp_path: Path) -> None:
    p = load_problem(
        CONFIGS / "models" / "paper-19.yaml",
        CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml",
        CONFIGS / "workloads" / "paper-alpha1.3.yaml",
    )
    plan = solve_greedy(p, progress=None)
    cfg = to_config(plan, p)
    dump_config(cfg, tmp_path / "plan.yaml")
    back = load_config(tmp_path / "plan.yaml")
    assert back == cfg
    assert [m.name for m in back.models] == [f"llm-{i}" for i in range(19)]
    assert back.models[0].path == str((CONFIGS / "models" / "llama-7b").resolve())
    assert back.models[18].path.endswith("llama-65b")
    assert back.meshes is not None
    placed = sorted(m.name for mesh in back.meshes for m in mesh.models)
    assert placed == sorted(m.name for m in back.models)
    for mesh in back.meshes:
        assert sum(m.kv_share for m in mesh.models) <= 1.0
        assert all(m.tensor_parallel == len(mesh.gpus) for m in mesh.models)
    assert back.engine.kv_pool_bytes == plan.kv_pool_bytes
    assert back.engine.kv_pool_bytes % back.engine.block_bytes == 0


def test_meshes_sit_on_nodes_without_overlap() -> None:
    p = problem([spec()] * 4, [50.0] * 4, cluster(nodes=2, gpus_per_node=2))
    plan = solve_greedy(p, progress=None)
    used = [(m.node, g) for m in plan.meshes for g in m.gpus]
    assert len(used) == len(set(used))
    assert all(0 <= n < 2 and 0 <= g < 2 for n, g in used)


def test_prefill_uses_the_sms_decodes_leave() -> None:
    p = problem([spec(), spec()], [1.0, 1.0], cluster(nodes=1, gpus_per_node=1))
    plan = solve_greedy(p, progress=None)
    (mesh,) = plan.meshes
    decode = sum(m.decode_share for m in mesh.models)
    for m in mesh.models:
        assert m.prefill_share == min(1.0, round(1.1 - decode - 0.01, 2))
        assert m.prefill_share + decode < 1.1  # one prefill is admitted beside every decode
