"""vLLM's sampling controls through the official `openai` client, each asserting its effect:
penalties, logit_bias, min_p, min_tokens, include_stop_str_in_output, best_of, allowed_token_ids,
bad_words; seeded requests with controls are batch-invariant; the token history reaches a
decode worker process that never saw the prefill (mps executor)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from muxserve.client.in_process import InProcessClient
from muxserve.config import parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.sampling_params import SamplingParams
from muxserve.server import create_app
from muxserve.server.background import BackgroundServer
from tests.helpers.server import wait_idle

openai = pytest.importorskip("openai")

MODEL = "qwen-demo"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(engine: MuxEngine) -> Iterator[Any]:
    app = create_app(InProcessClient(engine, manage=False))
    with BackgroundServer(app) as url:
        yield openai.OpenAI(api_key="x", base_url=f"{url}/v1", max_retries=0, timeout=60)
    wait_idle(engine)


def tokens(client: Any, **kw: Any) -> list[int]:
    """The generated token ids of one completion (read back from logprobs as token_id:N)."""
    extra = {"return_tokens_as_token_ids": True, **kw.pop("extra_body", {})}
    out = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=0, extra_body=extra, **kw)
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


# ---- penalties ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 2.0}},
    ],
)
def test_a_large_penalty_stops_the_repeats_greedy_decoding_makes(client, penalty):
    base = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    greedy = tokens(client, **base)
    assert repeats(greedy) == 4  # this prompt's greedy text repeats tokens (a loop of 435s)
    extra = {**base["extra_body"], **penalty.pop("extra_body", {})}
    penalised = tokens(client, **{**base, **penalty, "extra_body": extra})
    assert repeats(penalised) == 0
    assert penalised[0] == greedy[0]  # the first token has nothing to repeat


def test_a_negative_presence_penalty_makes_the_first_token_repeat(client):
    ids = tokens(
        client, max_tokens=6, temperature=0, presence_penalty=-2.0, extra_body={"ignore_eos": True}
    )
    greedy = tokens(client, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert ids[0] == greedy[0]
    assert ids[1] == ids[0]  # favoured: already generated
    assert ids != greedy


# ---- logit_bias, min_p, allowed_token_ids, bad_words ----------------------------------------
def test_logit_bias_of_100_forces_the_token(client):
    forced = tokens(
        client,
        max_tokens=5,
        temperature=1.0,
        seed=3,
        logit_bias={"77": 100},
        extra_body={"ignore_eos": True},
    )
    assert forced == [77] * 5
    banned = tokens(
        client,
        max_tokens=24,
        temperature=0,
        logit_bias={"435": -100},
        extra_body={"ignore_eos": True},
    )
    assert 435 not in banned


def test_min_p_of_1_keeps_only_the_most_likely_token(client):
    greedy = tokens(client, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    for seed in (1, 2, 3):
        hot = tokens(
            client,
            max_tokens=8,
            temperature=1.5,
            seed=seed,
            extra_body={"min_p": 1.0, "ignore_eos": True},
        )
        assert hot == greedy


def test_allowed_token_ids_are_all_that_is_sampled(client):
    allowed = [10, 11, 12]
    for seed in (1, 2):
        ids = tokens(
            client,
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body={"allowed_token_ids": allowed, "ignore_eos": True},
        )
        assert set(ids) <= set(allowed) and len(ids) == 12


def test_bad_words_are_never_generated(client, engine):
    tok = engine.models[MODEL].tokenizer
    greedy = tokens(client, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    word = tok.decode([greedy[3]])  # a word greedy decoding writes
    ids = tokens(
        client, max_tokens=24, temperature=0, extra_body={"ignore_eos": True, "bad_words": [word]}
    )
    assert ids[:3] == greedy[:3]
    assert greedy[3] not in ids


# ---- min_tokens, stops ------------------------------------------------------------------------
def test_min_tokens_outlasts_eos(client, engine):
    eos = min(engine.models[MODEL].tokenizer.eos_token_ids)
    forced_eos = {str(eos): 100}
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logit_bias=forced_eos
    )
    assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("stop", 1)
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logit_bias=forced_eos,
        extra_body={"min_tokens": 5},
    )
    # EOS was masked for 5 tokens, then (forced by the bias) ends it: 5 + the EOS
    assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("stop", 6)


def test_include_stop_str_in_output_and_stop_reason(client):
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    text = client.completions.create(**base, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[5:8]
    cut = client.completions.create(**base, stop=[stop]).choices[0]
    assert cut.text == text[: text.index(stop)]
    assert (cut.finish_reason, cut.model_extra["stop_reason"]) == ("stop", stop)
    kept = client.completions.create(
        **base, stop=[stop], extra_body={"include_stop_str_in_output": True}
    ).choices[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


# ---- best_of --------------------------------------------------------------------------------
def test_best_of_returns_the_n_best_by_cumulative_logprob(client):
    base = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 6,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    candidates = []
    for i in range(4):  # candidate i of a seeded request samples with seed + i
        c = client.completions.create(**base, seed=10 + i, logprobs=0).choices[0]
        candidates.append((sum(c.logprobs.token_logprobs), c.text))
    ranked = [t for _, t in sorted(candidates, key=lambda x: -x[0])]
    out = client.completions.create(**base, seed=10, n=2, best_of=4)
    assert [c.text for c in out.choices] == ranked[:2]
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.logprobs is None for c in out.choices)  # not asked for: not shown
    assert out.usage.completion_tokens == 2 * 6  # the returned choices' tokens, as vLLM
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(**base, n=3, best_of=2)
    with pytest.raises(openai.BadRequestError, match="streamed"):
        client.completions.create(**base, best_of=2, stream=True)


# ---- batch invariance -------------------------------------------------------------------------
CONTROLS: dict[str, Any] = {
    "temperature": 0.9,
    "presence_penalty": 0.7,
    "frequency_penalty": 0.3,
    "logit_bias": {"458": 2.5, "20": -5},
    "extra_body": {"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 4, "top_k": 50},
}


def test_seeded_requests_with_controls_are_batch_invariant(client):
    alone = [
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, seed=s, **CONTROLS)
        .choices[0]
        .text
        for s in (7, 8, 9)
    ]
    # the same three as the choices of one request (seeds 7, 8, 9), next to other traffic
    batched = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, seed=7, n=3, **CONTROLS
    )

    async def crowd() -> None:
        async_client = openai.AsyncOpenAI(
            api_key="x", base_url=str(client.base_url), max_retries=0, timeout=60
        )
        others = [
            async_client.completions.create(
                model=MODEL, prompt=p, max_tokens=16, temperature=1.0, seed=i, presence_penalty=-1
            )
            for i, p in enumerate(["A", "The quick brown fox", "Hello"])
        ]
        mine = async_client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, seed=8, **CONTROLS
        )
        got = await asyncio.gather(mine, *others)
        assert got[0].choices[0].text == alone[1]

    assert [c.text for c in batched.choices] == alone
    asyncio.run(crowd())
    assert len(set(alone)) == 3  # the controls did not collapse the seeds onto one text


# ---- a decode worker that never saw the prefill -------------------------------------------------
@pytest.fixture(scope="module")
def mps_engine(demo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    config = parse_config(
        {
            "models": [{"name": MODEL, "path": str(demo_models[MODEL])}],
            "engine": {**DEMO_ENGINE, "executor": "mps", "prefill_token_budget": 4},
        }
    )
    eng = MuxEngine(config)
    yield eng
    eng.shutdown()


def test_penalties_under_the_mps_executor_equal_inline(engine, mps_engine):
    """The decode worker gets the sequence's tokens once, with its first step: same text."""
    params = [
        SamplingParams(
            max_tokens=20,
            temperature=0.0,
            repetition_penalty=1.8,  # reads the prompt's tokens too
            presence_penalty=0.5,
            frequency_penalty=0.5,
            ignore_eos=True,
        ),
        SamplingParams(
            max_tokens=20, temperature=0.8, seed=4, repetition_penalty=0.6, ignore_eos=True
        ),
    ]
    prompts = ["the the the the the", "Once upon a time there was"]
    inline = engine.generate(prompts, params, MODEL)
    mps = mps_engine.generate(prompts, params, MODEL)
    assert [c.token_ids for c in mps] == [c.token_ids for c in inline]
    assert [len(c.token_ids) for c in mps] == [20, 20]
    mps_engine.check_integrity()
