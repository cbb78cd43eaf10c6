from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from muxserve.config import dump_config, load_config
from muxserve.models.hf_config import parse_hf_config
from placement.greedy import solve_greedy
from placement.plan import to_config
from placement.problem import load_problem
from placement.specs import PlannerModel, spec_from_config
from tests.helpers.placement import CONFIGS, cluster, llama_config, problem, spec


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
    for mesh, placed_mesh in zip(back.meshes, plan.meshes, strict=True):
        assert sum(m.kv_share for m in mesh.models) <= 1.0
        assert all(m.tensor_parallel == len(mesh.gpus) for m in mesh.models)
        assert mesh.kv_pool_bytes == placed_mesh.kv_pool_bytes
        assert mesh.kv_pool_bytes % back.engine.block_bytes == 0
    assert back.engine.kv_pool_bytes == plan.kv_pool_bytes
    assert back.engine.kv_pool_bytes == min(m.kv_pool_bytes for m in back.meshes)
    assert {m.dtype for m in back.models} == {"float16"}


def fp32_checkpoint_spec(name: str) -> PlannerModel:
    """A model whose config.json says float32: served (and budgeted) in float16 on a GPU."""
    return spec_from_config(
        name, f"/ckpt/{name}", parse_hf_config(llama_config() | {"torch_dtype": "float32"})
    )


def test_each_mesh_gets_its_own_pool_and_each_model_its_dtype() -> None:
    p = problem(
        [fp32_checkpoint_spec("a"), spec(layers=8), spec(hidden=1024, heads=8)],
        [20.0, 20.0, 5.0],
        cluster(nodes=2, gpus_per_node=1),
    )
    cfg = to_config(solve_greedy(p, progress=None), p)
    assert cfg.meshes is not None
    # 0.9 x 4 GiB per GPU, less each model's weights, activations and reserve, in 16 KiB blocks
    assert [(m.name, [x.name for x in m.models], m.kv_pool_bytes) for m in cfg.meshes] == [
        ("mesh-0", ["m1"], 3_700_899_840),
        ("mesh-1", ["m0", "m2"], 3_473_457_152),
    ]
    assert cfg.for_mesh("mesh-0").engine.kv_pool_bytes == 3_700_899_840
    assert cfg.engine.kv_pool_bytes == 3_473_457_152  # one engine for all of it: the least
    # written out, so an engine on a device that defaults to another dtype serves these
    assert [m.dtype for m in cfg.models] == ["float16"] * 3


def test_an_engine_section_keeps_its_own_pool_size() -> None:
    p = problem([spec(), spec()], [20.0, 5.0], cluster(nodes=2, gpus_per_node=1))
    p = replace(p, engine_is_default=False)
    cfg = to_config(solve_greedy(p, progress=None), p)
    assert cfg.meshes is not None
    assert [m.kv_pool_bytes for m in cfg.meshes] == [None] * len(cfg.meshes)
    assert cfg.engine.kv_pool_bytes is None


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
