"""What is simulated is what is served: for one plan, the simulator and each mesh's engine
derive the same dtype, per-rank KV layout, pool blocks and initial KV quotas per model.

No engine is built (that needs the weights and, for TP, two GPUs): both sides' descriptors
are compared, each computed by the code its side runs — the engine's `describe_entry` on
`MuxConfig.for_mesh` and `PoolSizing`, the simulator's `served_mesh`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from muxserve.config import EngineConfig, MuxConfig
from muxserve.kv.layout import KVLayout
from muxserve.model_descriptor import ModelDescriptor, describe_entry
from muxserve.models.hf_config import load_hf_config
from muxserve.runner.kv_pool import PoolSizing
from muxserve.scheduler.scheduler import Scheduler
from placement.greedy import solve_greedy
from placement.mesh_replay import served_mesh
from placement.plan import Placement, to_config
from placement.problem import Problem, make_problem
from placement.specs import load_models
from tests.helpers.placement import cluster, llama_config, workload

CHECKPOINTS = {
    "m0": llama_config(hidden=1024, layers=16, heads=16, kv_heads=8, vocab=32000),  # 0.59 GiB
    # a float32 checkpoint: a CPU engine would default to float32, the plan budgets float16
    "m1": llama_config() | {"torch_dtype": "float32"},
    "m2": llama_config(layers=8, heads=8, kv_heads=2),
}
BLOCK = 16 << 10  # the default engine's block


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Problem, Placement, MuxConfig]:
    """Three GPUs of 0.75 GiB: m0 needs two (tp=2), m1 and m2 share the third (tp=1)."""
    root = tmp_path_factory.mktemp("models")
    for name, raw in CHECKPOINTS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(raw))
    lines = "".join(f"  - {{name: {n}, path: {n}}}\n" for n in CHECKPOINTS)
    (root / "models.yaml").write_text(f"models:\n{lines}")
    ms = load_models(root / "models.yaml")
    problem = make_problem(
        ms.specs,
        workload([2.0, 10.0, 10.0]),
        cluster(nodes=1, gpus_per_node=3, memory_gib=0.75),
        entries=ms.entries,
        engine_is_default=ms.engine_is_default,
    )
    placement = solve_greedy(problem, progress=None)
    return problem, placement, to_config(placement, problem)


def engine_side(config: MuxConfig, mesh: str, on_gpu: bool) -> tuple[list[ModelDescriptor], int]:
    """What the mesh's engine derives: its models' descriptors and its pool's blocks."""
    cfg = config.for_mesh(mesh)
    models = [
        describe_entry(e, load_hf_config(Path(e.path)), cfg.engine, on_gpu=on_gpu)
        for e in cfg.models
    ]
    # the plan sizes the pool: no device is asked, on a GPU or here
    return models, PoolSizing.of(cfg.engine).num_blocks([torch.device("cpu")])


def facts(models: list[ModelDescriptor], num_blocks: int, config: EngineConfig) -> dict:
    """Everything both sides must agree on, with the quotas the scheduler starts from."""
    sched = Scheduler.create([m.slot for m in models], num_blocks, config)
    return {
        "num_blocks": num_blocks,
        "quotas": sched.pool.snapshot(),
        "models": {
            m.name: (m.dtype, m.tensor_parallel, m.layout, m.max_model_len, m.kv_share, m.slot.rate)
            for m in models
        },
    }


def test_the_plan_has_a_tp2_mesh_and_a_shared_tp1_mesh(planned) -> None:
    _, placement, config = planned
    layout = [(m.gpus, [(x.name, x.tensor_parallel) for x in m.models]) for m in placement.meshes]
    assert layout == [((0, 1), [("m0", 2)]), ((2,), [("m1", 1), ("m2", 1)])]
    assert [m.kv_pool_bytes for m in config.meshes] == [278_298_624, 438_632_448]


@pytest.mark.parametrize("on_gpu", [True, False])
def test_simulator_and_engine_derive_the_same_blocks_and_dtype(planned, on_gpu: bool) -> None:
    problem, placement, config = planned
    for k, placed in enumerate(placement.meshes):
        simulated = facts(*served_mesh(placed, problem), problem.engine)
        served = facts(*engine_side(config, f"mesh-{k}", on_gpu), config.engine)
        assert simulated == served


def test_the_derived_blocks(planned) -> None:
    """The numbers themselves: one rank's heads per block, per-mesh pools, the plan's shares."""
    problem, placement, _ = planned
    tp2, shared = (facts(*served_mesh(m, problem), problem.engine) for m in placement.meshes)
    # m0: 8 KV heads over 2 ranks; 278298624 bytes per GPU of 16 KiB blocks
    assert tp2["models"]["m0"][:3] == ("float16", 2, KVLayout(16, 4, 64, 2, BLOCK))
    assert (tp2["num_blocks"], tp2["quotas"]) == (16986, {"m0": (0, 16986)})
    assert shared["models"]["m1"][:3] == ("float16", 1, KVLayout(4, 8, 64, 2, BLOCK))
    assert shared["models"]["m2"][:3] == ("float16", 1, KVLayout(8, 2, 64, 2, BLOCK))
    # kv_share 0.6549 and 0.345 of 26772 blocks, normalised over their sum 0.9999:
    # 17534.74 and 9237.26, the spare block to the larger remainder
    assert shared["num_blocks"] == 26772
    assert shared["quotas"] == {"m1": (0, 17535), "m2": (0, 9237)}
