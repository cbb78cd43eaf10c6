"""The engine's greedy parity with tensor parallelism 2 over gloo: two worker processes per
(model, phase), each with half of the heads, a vocabulary slice and its KV heads' blocks.

llama-demo (4 heads, 4 KV heads) and qwen-demo (8 heads, 2 KV heads) divide by 2;
mistral-demo (1 KV head) does not and is refused with a clear error.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from muxserve.config import MuxConfig, parse_config
from muxserve.engine import MuxEngine
from muxserve.kv.layout import KVLayout
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Phase
from tests.helpers.engine import MAX_NEW, hf_greedy, make_config, prompts_for, run_all

TP_MODELS = ["llama-demo", "qwen-demo"]
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def tp_config(demo_models: dict[str, Path], names: list[str]) -> MuxConfig:
    raw = make_config(demo_models, executor="mps").model_dump()
    raw["models"] = [
        m | {"tensor_parallel": 2, "sm_share": {"prefill": 0.5, "decode": 0.5}}
        for m in raw["models"]
        if m["name"] in names
    ]
    return parse_config(raw)


@pytest.fixture(scope="module")
def engine(demo_models: dict[str, Path]) -> MuxEngine:
    eng = MuxEngine(tp_config(demo_models, TP_MODELS))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def greedy_outputs(engine: MuxEngine) -> dict[str, list[list[int]]]:
    return run_all(engine, GREEDY)


def test_two_ranks_per_model_and_phase(engine):
    pids = engine.executor.worker_pids()
    assert {k: len(v) for k, v in pids.items()} == {(m, p): 2 for m in TP_MODELS for p in Phase}


def test_each_rank_pools_its_own_kv_heads(engine):
    """4 MiB of 4 KiB blocks per rank, not per mesh: each rank index has its own buffer of all
    1024 blocks, and the scheduler's block of a model holds one rank's KV heads."""
    pools = engine.executor.pools
    assert [(p.num_blocks, p.buffer.numel()) for p in pools] == [(1024, 4 << 20)] * 2
    assert pools[0].buffer.data_ptr() != pools[1].buffer.data_ptr()
    assert all(p.buffer.is_shared() for p in pools)
    assert engine.scheduler.pool.num_blocks == 1024
    layouts = {m: engine.scheduler.queues[m].slot.layout for m in TP_MODELS}
    # (layers, KV heads per rank, head_dim, float32, block bytes): 4 / 2 and 2 / 2 heads
    assert layouts == {
        "llama-demo": KVLayout(2, 2, 32, 4, 4096),
        "qwen-demo": KVLayout(3, 1, 16, 4, 4096),
    }
    # a 40-token qwen request: 2 logical blocks (32 tokens each) x 3 layers x 1 head
    assert layouts["qwen-demo"].physical_blocks_for(40) == 6


@pytest.mark.parametrize("model", TP_MODELS)
def test_greedy_matches_hf_generate(model, greedy_outputs, engine, demo_models):
    assert greedy_outputs[model] == [list(r) for r in hf_greedy(model, demo_models[model])]
    engine.check_integrity()
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_a_dead_rank_restarts_its_group(engine, demo_models):
    """One rank killed while idle: both ranks of its group restart, and the job goes to them."""
    group = engine.executor.groups[("qwen-demo", Phase.DECODE)]
    old = [p.pid for p in group.procs]
    os.kill(old[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not dead(old[1]):  # gone before the job is sent: the job is kept for the new ranks
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [c] = engine.generate([prompts_for("qwen-demo")[2]], GREEDY, "qwen-demo")
    assert c.token_ids == list(hf_greedy("qwen-demo", demo_models["qwen-demo"])[2])
    assert not set(old) & {p.pid for p in group.procs}


def dead(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_a_model_whose_heads_do_not_divide_is_refused(demo_models):
    with pytest.raises(ValueError, match=r"tensor_parallel=2 must divide .*KV heads \(1\)"):
        MuxEngine(tp_config(demo_models, ["mistral-demo"]))
