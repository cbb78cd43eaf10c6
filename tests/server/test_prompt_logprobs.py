"""echo and prompt logprobs through the official `openai` client: equal to transformers' forward
on the same tokens within 1e-4 (fp32), with the prompt prefilled in chunks; the
loglikelihood request lm-evaluation-harness sends; vLLM's `prompt_logprobs` shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from muxserve.client.in_process import InProcessClient
from muxserve.engine import MuxEngine
from muxserve.server import create_app
from muxserve.server.background import BackgroundServer
from tests.helpers.server import demo_config, wait_idle

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

MODELS = ("llama-demo", "qwen-demo", "mistral-demo")
TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
CHUNK = 5  # prefill token budget: the prompt is scored over several chunks


@pytest.fixture(scope="module")
def chunked(demo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    config = demo_config(demo_models).model_dump()
    config["engine"]["prefill_token_budget"] = CHUNK
    from muxserve.config import parse_config

    eng = MuxEngine(parse_config(config))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(chunked: MuxEngine) -> Iterator[Any]:
    app = create_app(InProcessClient(chunked, manage=False))
    with BackgroundServer(app) as url:
        yield openai.OpenAI(api_key="x", base_url=f"{url}/v1", max_retries=0, timeout=60)
    wait_idle(chunked)


@pytest.fixture(scope="module")
def hf_logprobs(
    demo_models: dict[str, Path], chunked: MuxEngine
) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Per model: the prompt's ids and transformers' log-softmax at every position (fp32)."""
    out = {}
    for name in MODELS:
        ids = chunked.models[name].tokenizer.encode(TEXT)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            demo_models[name], dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        out[name] = (ids, torch.log_softmax(logits, dim=-1))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_echo_with_max_tokens_0_gives_the_prompts_logprobs_as_transformers(
    client, hf_logprobs, chunked, model
):
    ids, logp = hf_logprobs[model]
    assert len(ids) > 3 * CHUNK
    out = client.completions.create(
        model=model,
        prompt=ids,
        max_tokens=0,
        echo=True,
        logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},  # exact ids: texts can coincide
    )
    [choice] = out.choices
    lp = choice.logprobs
    assert (choice.finish_reason, out.usage.completion_tokens) == ("length", 0)
    assert out.usage.prompt_tokens == len(ids)
    assert lp.tokens == [f"token_id:{t}" for t in ids]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for i in range(1, len(ids)):  # transformers' two most likely, and the token itself
        top = logp[i - 1].topk(2)
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        want = {f"token_id:{t}": v for t, v in pairs}
        want[f"token_id:{ids[i]}"] = expected[i - 1]
        assert lp.top_logprobs[i] == pytest.approx(want, abs=1e-4)
    text = chunked.models[model].tokenizer.decode(ids, skip_special_tokens=False)
    assert choice.text == text  # token ids echo as they decode (special tokens kept)


def test_the_loglikelihood_request_of_lm_evaluation_harness(client, hf_logprobs):
    """local-completions: echo, logprobs 1, max_tokens 1, temperature 0; it sums
    token_logprobs[ctxlen:-1] and calls a continuation greedy if each equals its top one."""
    model = "qwen-demo"
    ids, logp = hf_logprobs[model]
    ctxlen = 6
    out = client.completions.create(
        model=model, prompt=[ids], temperature=0, max_tokens=1, logprobs=1, seed=1234, echo=True
    )
    [choice] = out.choices
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) + 1  # the prompt, then the one generated token
    got = sum(lp.token_logprobs[ctxlen:-1])
    expected = sum(logp[i - 1, ids[i]].item() for i in range(ctxlen, len(ids)))
    assert got == pytest.approx(expected, abs=1e-3)
    greedy = all(
        t == max(top.values())
        for t, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1], strict=True)
    )
    hf_greedy = all(logp[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))
    assert greedy == hf_greedy
    # the generated token is the greedy one, and its logprob is transformers' at the end
    assert lp.token_logprobs[-1] == pytest.approx(logp[-1].max().item(), abs=1e-4)


def test_chunked_and_whole_prefills_agree(client, engine, hf_logprobs):
    """The session engine prefills the prompt in one chunk: the same logprobs."""
    from muxserve.sampling_params import SamplingParams

    ids, _ = hf_logprobs["mistral-demo"]
    whole = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0), "mistral-demo")[
        0
    ]
    out = client.completions.create(
        model="mistral-demo", prompt=ids, max_tokens=0, echo=True, logprobs=0
    )
    assert whole.prompt_logprobs is not None
    assert out.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [p.logprob for p in whole.prompt_logprobs], abs=1e-5
    )


def test_vllm_prompt_logprobs_field(client, hf_logprobs):
    model = "llama-demo"
    ids, logp = hf_logprobs[model]
    out = client.completions.create(
        model=model, prompt=ids, max_tokens=2, extra_body={"prompt_logprobs": 3}
    )
    [choice] = out.choices
    assert choice.logprobs is None  # logprobs were not asked for
    plp = choice.model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for i in (1, 7, len(ids) - 1):
        entry = plp[i]
        mine = entry[str(ids[i])]
        assert mine["logprob"] == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4)
        assert mine["rank"] == int((logp[i - 1] > logp[i - 1, ids[i]]).sum()) + 1
        top = logp[i - 1].topk(3).indices.tolist()
        assert [entry[str(t)]["rank"] for t in top] == [1, 2, 3]
        assert set(entry) == {str(t) for t in top} | {str(ids[i])}


def test_echo_streams_the_prompt_first(client, chunked):
    tok = chunked.models["qwen-demo"].tokenizer
    chunks = list(
        client.completions.create(
            model="qwen-demo",
            prompt="Hello there",
            max_tokens=3,
            echo=True,
            stream=True,
            logprobs=0,
            temperature=0,
        )
    )
    whole = client.completions.create(
        model="qwen-demo", prompt="Hello there", max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    assert chunks[0].choices[0].text.startswith("Hello there")
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [t for c in chunks for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    assert len(streamed) == len(tok.encode("Hello there")) + 3
