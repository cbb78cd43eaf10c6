"""MuxEngine end to end on the demo models: parity with HF, pressure, bad input, streaming."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from muxserve.config import parse_config
from muxserve.engine import MuxEngine
from muxserve.errors import (
    CheckpointError,
    EmptyPromptError,
    PromptTooLongError,
    RequestError,
    UnknownModelError,
)
from muxserve.sampling_params import SamplingParams
from tests.helpers.engine import (
    MAX_NEW,
    PROMPT_LENGTHS,
    TIGHT_POOL,
    hf_greedy,
    make_config,
    prompts_for,
    run_all,
)


@pytest.fixture(scope="module")
def engine(demo_models: dict[str, Path]) -> MuxEngine:
    eng = MuxEngine(make_config(demo_models))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def greedy_outputs(engine: MuxEngine) -> dict[str, list[list[int]]]:
    return run_all(engine, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))


@pytest.fixture(scope="module")
def hf_outputs(demo_models: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {n: [list(r) for r in hf_greedy(n, p)] for n, p in demo_models.items()}


# ---- parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama-demo", "qwen-demo", "mistral-demo"])
def test_greedy_matches_hf_generate(model, greedy_outputs, hf_outputs, engine):
    assert greedy_outputs[model] == hf_outputs[model]
    assert len(greedy_outputs[model]) == len(PROMPT_LENGTHS)
    engine.check_integrity()


def test_every_block_free_after_generate(engine, greedy_outputs):
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks
    assert all(s.blocks_used == 0 and s.running == 0 for s in engine.stats().values())


@pytest.mark.parametrize("policy,kv_mode", [("fcfs", "unified"), ("adbs", "static")])
def test_baselines_give_the_same_tokens(demo_models, greedy_outputs, policy, kv_mode):
    eng = MuxEngine(make_config(demo_models, policy=policy, kv_mode=kv_mode))
    assert run_all(eng, SamplingParams(max_tokens=MAX_NEW, temperature=0.0)) == greedy_outputs
    eng.check_integrity()


# ---- pressure ------------------------------------------------------------------------------
def test_pressure_preempts_and_still_matches(demo_models, greedy_outputs):
    """A pool far too small: requests are preempted and recomputed, and the text is unchanged."""
    eng = MuxEngine(make_config(demo_models, kv_pool_bytes=TIGHT_POOL))
    got = run_all(eng, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    assert eng.scheduler.num_preemptions > 0
    assert got == greedy_outputs
    assert eng.scheduler.pool.num_free == eng.scheduler.pool.num_blocks
    eng.check_integrity()


def test_pressure_with_seeded_sampling_is_reproducible(demo_models):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    roomy = run_all(MuxEngine(make_config(demo_models)), params)
    tight_engine = MuxEngine(make_config(demo_models, kv_pool_bytes=TIGHT_POOL))
    assert run_all(tight_engine, params) == roomy
    assert tight_engine.scheduler.num_preemptions > 0


def test_quotas_move_toward_the_loaded_model(demo_models):
    eng = MuxEngine(make_config(demo_models, kv_pool_bytes=TIGHT_POOL, rebalance_interval=2))
    before = {m: s.blocks_quota for m, s in eng.stats().items()}
    rng = random.Random(0)
    for _ in range(12):
        prompt = [rng.randrange(3, 900) for _ in range(60)]
        eng.add_request("mistral-demo", prompt, SamplingParams(max_tokens=30, temperature=0))
    peak = dict(before)
    while eng.has_work():
        eng.step()
        for m, s in eng.stats().items():
            peak[m] = (
                max(peak[m], s.blocks_quota)
                if m == "mistral-demo"
                else min(peak[m], s.blocks_quota)
            )
        eng.check_integrity()
    assert peak["mistral-demo"] > before["mistral-demo"]
    assert peak["llama-demo"] < before["llama-demo"]
    assert peak["qwen-demo"] < before["qwen-demo"]


# ---- bad input -----------------------------------------------------------------------------
def _pool_untouched(eng: MuxEngine) -> None:
    assert eng.scheduler.pool.num_free == eng.scheduler.pool.num_blocks
    assert not eng.has_work()


@pytest.mark.parametrize(
    "model,prompt,params,error,param",
    [
        ("gpt-4", "hi", {}, UnknownModelError, "model"),
        ("llama-demo", "", {}, EmptyPromptError, "prompt"),
        ("llama-demo", [], {}, EmptyPromptError, "prompt"),
        ("llama-demo", [5] * 5000, {}, PromptTooLongError, "prompt"),
        ("llama-demo", [5] * 10, {"max_tokens": 5000}, PromptTooLongError, "max_tokens"),
        ("llama-demo", [10**9], {}, RequestError, "prompt"),
    ],
)
def test_bad_requests_raise_before_allocating(engine, model, prompt, params, error, param):
    with pytest.raises(error) as e:
        engine.add_request(model, prompt, SamplingParams(**params))
    assert e.value.param == param
    _pool_untouched(engine)
    # the engine goes on serving the others
    [c] = engine.generate(["still alive"], SamplingParams(max_tokens=3, temperature=0), "qwen-demo")
    assert len(c.token_ids) == 3


def test_checkpoint_missing_weights(demo_models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in demo_models["llama-demo"].iterdir():
        if not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
    cfg = make_config(demo_models).model_dump()
    cfg["models"].append({"name": "broken", "path": str(broken)})
    with pytest.raises(CheckpointError, match="broken"):
        MuxEngine(parse_config(cfg))


# ---- generate() on a running loop ---------------------------------------------------------------
def test_generate_on_the_background_loop_matches(demo_models, greedy_outputs):
    eng = MuxEngine(make_config(demo_models))
    try:
        eng.start()
        got = run_all(eng, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    finally:
        eng.shutdown()
    assert got == greedy_outputs


def test_generate_timeout_aborts_what_is_unfinished(engine):
    params = SamplingParams(max_tokens=64, temperature=0.0)
    free = engine.scheduler.pool.num_free
    # the deadline has passed by the first check, before any step: every request is unfinished
    with pytest.raises(TimeoutError, match="3 of 3 requests unfinished"):
        engine.generate(["a", "b", "c"], params, "llama-demo", timeout_s=1e-9)
    assert engine.scheduler.pool.num_free == free
    assert all(s.running == 0 and s.waiting == 0 for s in engine.stats().values())
    engine.check_integrity()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_generate_rejects_a_bad_timeout(engine, bad):
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        engine.generate(["a"], SamplingParams(max_tokens=1), "llama-demo", timeout_s=bad)


# ---- streaming, stop, abort, seeds -----------------------------------------------------------
def test_stream_deltas_add_up(engine):
    params = SamplingParams(max_tokens=16, temperature=0.0)
    [whole] = engine.generate(["Hello there"], params, "llama-demo")

    async def collect() -> list:
        engine.start()
        rid = engine.add_request("llama-demo", "Hello there", params)
        return [o async for o in engine.stream(rid)]

    try:
        outs = asyncio.run(collect())
    finally:
        engine.shutdown()
    assert "".join(o.text for o in outs) == whole.text
    # generate() joins the same deltas: the reference is decoding every output token at once,
    # which a delta that split a multi-byte character would not match
    tokenizer = engine.models["llama-demo"].tokenizer
    assert whole.text == tokenizer.decode(whole.token_ids)
    assert [t for o in outs for t in o.token_ids] == whole.token_ids
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].finish_reason == whole.finish_reason
    assert outs[-1].completion_tokens == len(whole.token_ids)


def test_stop_string_truncates(engine):
    params = SamplingParams(max_tokens=20, temperature=0.0)
    [free] = engine.generate(["Once upon a time"], params, "mistral-demo")
    cut = next(i for i in range(3, len(free.text)) if free.text[i - 2 : i].strip())
    stop = free.text[cut - 2 : cut]
    first = free.text.find(stop)
    [c] = engine.generate(
        ["Once upon a time"],
        SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)),
        "mistral-demo",
    )
    assert c.text == free.text[:first]
    assert c.finish_reason == "stop"
    _pool_untouched(engine)


def test_stop_token_ids(engine, greedy_outputs):
    expected = greedy_outputs["qwen-demo"][3]
    stop_tok = expected[4]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(stop_tok,))
    [c] = engine.generate([prompts_for("qwen-demo")[3]], params, "qwen-demo")
    assert c.token_ids == expected[: expected.index(stop_tok) + 1]
    assert c.finish_reason == "stop"


def test_abort_frees_blocks(engine):
    rid = engine.add_request("llama-demo", [7] * 50, SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    assert engine.stats()["llama-demo"].blocks_used > 0
    assert engine.abort(rid)
    assert not engine.abort(rid)
    _pool_untouched(engine)
    engine.check_integrity()


def test_seeded_sampling_ignores_other_traffic(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=1234)
    [alone] = engine.generate(["The weather today"], params, "qwen-demo")
    busy = engine.generate(
        ["The weather today", "noise one", "noise two", "The weather today"],
        [
            params,
            SamplingParams(max_tokens=8, temperature=1.0),
            SamplingParams(max_tokens=5),
            params,
        ],
        ["qwen-demo", "qwen-demo", "llama-demo", "qwen-demo"],
    )
    assert busy[0].token_ids == alone.token_ids == busy[3].token_ids
    other = engine.generate(
        ["The weather today"], SamplingParams(max_tokens=12, seed=99), "qwen-demo"
    )
    assert other[0].token_ids != alone.token_ids


def test_logprobs(engine):
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3)
    [c] = engine.generate(["Hello"], params, "llama-demo")
    assert [lp.token_id for lp in c.logprobs] == c.token_ids
    for lp in c.logprobs:
        assert len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy: the sampled token is the most likely
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_text_equals_decoding_all_tokens_at_once(engine):
    """Deltas never split a multi-byte character: the streamed text, joined, is what decoding
    every output token at once gives (random weights emit plenty of partial UTF-8 bytes)."""
    prompts = ["Ünïcödé 日本語 emoji 🙂", "naïve café", "汉字 and ascii", "plain text"]
    split = 0
    for model, served in engine.models.items():
        outs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0), model)
        for c in outs:
            assert c.text == served.tokenizer.decode(c.token_ids)
            split += any(ord(ch) > 0x7F for ch in c.text)
    assert split > 0  # the check saw non-ASCII output, so it could have failed
