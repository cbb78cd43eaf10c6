"""The engine's parity tests with the mps executor: worker processes over a shared-memory pool.

Same config, prompts and reference as tests/test_engine.py, with `executor: mps` and SM shares
that let jobs of several models run at once; the engine is shared with test_mps_faults.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from muxserve.engine import MuxEngine
from muxserve.executor.mps import MpsExecutor
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Phase
from tests.helpers.engine import GREEDY, hf_greedy, make_config, run_all
from tests.helpers.mps import SHARES, mps_config

MODELS = ["llama-demo", "qwen-demo", "mistral-demo"]
# tighter than the inline tests' TIGHT_POOL (200 blocks), where a run under load preempted 0-3
# times: here 96 blocks (the largest request needs 80), 4-13 preemptions per run
MPS_TIGHT_POOL = 96 * 4096


@pytest.fixture(scope="module")
def engine(mps_engine: MuxEngine) -> MuxEngine:
    return mps_engine


@pytest.fixture(scope="module")
def greedy_outputs(engine: MuxEngine) -> dict[str, list[list[int]]]:
    return run_all(engine, GREEDY)


@pytest.fixture(scope="module")
def inline(demo_models: dict[str, Path]) -> MuxEngine:
    return MuxEngine(make_config(demo_models))


def test_one_worker_process_per_model_and_phase(engine):
    assert isinstance(engine.executor, MpsExecutor)
    pids = engine.executor.worker_pids()
    assert set(pids) == {(m, p) for m in MODELS for p in Phase}
    flat = [pid for group in pids.values() for pid in group]
    assert len(set(flat)) == 6 and os.getpid() not in flat
    assert engine.pool.buffer.is_shared()


@pytest.mark.parametrize("model", MODELS)
def test_greedy_matches_hf_generate(model, greedy_outputs, engine, demo_models):
    assert greedy_outputs[model] == [list(r) for r in hf_greedy(model, demo_models[model])]
    engine.check_integrity()


def test_every_block_free_after_generate(engine, greedy_outputs):
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks
    assert all(s.blocks_used == 0 and s.running == 0 for s in engine.stats().values())


def test_seeded_sampling_and_logprobs_match_inline(engine, inline):
    """Sampling settings reach the workers once per request and still decide every token."""
    prompts = ["The weather today", "Once upon a time", "Hello", "noise"]
    params = [
        SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=1234),
        SamplingParams(max_tokens=8, temperature=0.7, top_p=0.8, seed=5, logprobs=2),
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=(7,)),
    ]
    models = ["qwen-demo", "llama-demo", "mistral-demo", "qwen-demo"]
    got = engine.generate(prompts, params, models)
    want = inline.generate(prompts, params, models)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    for g, w in zip(got, want, strict=True):
        tops = [t for lp in g.logprobs for t in lp.top], [t for lp in w.logprobs for t in lp.top]
        assert [i for i, _ in tops[0]] == [i for i, _ in tops[1]]
        assert [v for _, v in tops[0]] == pytest.approx([v for _, v in tops[1]], abs=1e-5)


def test_abort_while_in_flight_frees_blocks(engine):
    rid = engine.add_request("llama-demo", [7] * 50, SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    assert engine.stats()["llama-demo"].blocks_used > 0
    assert engine.abort(rid)
    while engine.scheduler.jobs_in_flight:
        engine.step()
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks
    engine.check_integrity()


def test_pressure_preempts_and_the_workers_recompute_with_hf_tokens(demo_models, greedy_outputs):
    """A pool far too small: requests are preempted, and each re-admission (`Job.fresh`) makes
    every worker of the model take its new block table whole; the tokens are unchanged."""
    config = mps_config(demo_models, sm_share=SHARES, kv_pool_bytes=MPS_TIGHT_POOL)
    with MuxEngine(config) as tight:
        for _ in range(3):  # whether a run preempts depends on when the workers answer
            assert run_all(tight, GREEDY) == greedy_outputs
            if tight.scheduler.num_preemptions:
                break
        assert tight.scheduler.num_preemptions > 0
        assert tight.scheduler.pool.num_free == tight.scheduler.pool.num_blocks
        tight.check_integrity()
