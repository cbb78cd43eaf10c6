"""1,000 malformed or hostile requests: never a 500, the server stays healthy, every block free.

Bad JSON, wrong types, huge numbers, unknown fields, 10 MB bodies, odd routes and methods,
clients that vanish mid-stream or before the answer, mixed with valid requests (small
max_tokens, so the whole run stays short on two cores).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import aiohttp

from tests.helpers.server import samples, value, wait_idle
from tests.helpers.wait import until

MODELS = ["llama-demo", "qwen-demo", "mistral-demo"]
OK_STATUSES = {200, 400, 404, 405, 413}
COMPLETION = {"model": "llama-demo", "prompt": "hello", "max_tokens": 2}
CHAT = {"model": "qwen-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
WRONG_VALUES: list[Any] = [None, True, -1, 0, 1.5, "x", "", [], [None], {}, {"a": 1}, [[[]]]]
HUGE: list[Any] = [10**30, -(10**30), 2**63, 2**64, 1e308, -1e308, 1e-308, 10**18]
FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stop",
    "seed",
    "logprobs",
    "stream_options",
    "stop_token_ids",
    "ignore_eos",
    "user",
]
CHAT_FIELDS = [
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "response_format",
    "tool_choice",
]


class Case:
    """One request: how to send it, and whether the client hangs up instead of waiting."""

    def __init__(
        self,
        method: str,
        path: str,
        data: Any = None,
        *,
        hang_up: str = "",
        expect: set[int] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.method, self.path, self.data, self.hang_up = method, path, data, hang_up
        self.expect = expect or OK_STATUSES
        self.headers = headers or {"Content-Type": "application/json"}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def cases(rng: random.Random) -> list[Case]:
    out: list[Case] = []
    valid = dumps(COMPLETION)
    for _ in range(120):  # broken JSON
        cut = valid[: rng.randrange(len(valid))]
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        out.append(
            Case(
                "POST",
                rng.choice(["/v1/completions", "/v1/chat/completions"]),
                rng.choice([cut, junk, b"[" * 3000, b"{" * 3000, b"nul", b'{"a":}']),
            )
        )
    for _ in range(200):  # wrong types and values, any field
        field, path, base = rng.choice(
            [(f, "/v1/completions", COMPLETION) for f in FIELDS]
            + [(f, "/v1/chat/completions", CHAT) for f in CHAT_FIELDS]
        )
        out.append(Case("POST", path, dumps({**base, field: rng.choice(WRONG_VALUES)})))
    for _ in range(150):  # huge and edge numbers (NaN and Infinity too)
        field = rng.choice(
            ["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "logprobs", "prompt"]
        )
        v = rng.choice([*HUGE, float("nan"), float("inf")])
        v = [v] if field == "prompt" and not isinstance(v, float) else v
        out.append(Case("POST", "/v1/completions", dumps({**COMPLETION, field: v})))
    for i in range(100):  # unknown fields, at the top and inside
        extra = {f"field_{i}": rng.choice(WRONG_VALUES)}
        body = (
            {**CHAT, **extra}
            if i % 2
            else {**COMPLETION, "stream_options": {"include_usage": True, **extra}}
        )
        out.append(
            Case("POST", "/v1/chat/completions" if i % 2 else "/v1/completions", dumps(body))
        )
    for i in range(100):  # hostile messages
        msg = rng.choice(
            [
                {"role": "user", "content": [{"type": "image_url"}]},
                {"role": "tool", "content": "x"},
                {"role": "user", "content": None},
                {"role": "user", "content": "{{ 7 * 7 }}{% raise %}"},
                {"role": "user", "content": "\x00" * 100},
                {"role": "user"},
                {"role": "user", "content": "a", "name": 5},
                "user",
                5,
            ]
        )
        out.append(
            Case("POST", "/v1/chat/completions", dumps({**CHAT, "messages": [msg] * (1 + i % 3)}))
        )
    for i in range(10):  # 10 MB bodies, declared or chunked
        big = b'{"model": "llama-demo", "prompt": "' + b"a" * 10_000_000 + b'"}'
        out.append(Case("POST", "/v1/completions", big if i % 2 else _chunks(big), expect={413}))
    out.append(
        Case(
            "POST",
            "/v1/completions",  # 3 MB: under the limit, far over the context
            dumps({**COMPLETION, "prompt": "hello world " * 250_000}),
            expect={400},
        )
    )
    for _ in range(40):  # odd routes, methods, headers
        out.append(
            rng.choice(
                [
                    Case("GET", "/v1/completions"),
                    Case("DELETE", "/v1/models"),
                    Case("GET", "/v1/models/" + "x" * 2000),
                    Case("GET", "/../../etc/passwd"),
                    Case(
                        "POST",
                        "/v1/completions",
                        valid,
                        headers={"Content-Type": "text/plain"},
                        expect={200},
                    ),
                    Case("POST", "/v1/completions", b"", expect={400}),
                ]
            )
        )
    for i in range(60):  # clients that vanish mid-stream
        body = {
            **COMPLETION,
            "model": MODELS[i % 3],
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "n": 1 + i % 2,
        }
        out.append(Case("POST", "/v1/completions", dumps(body), hang_up="stream"))
    for i in range(20):  # clients that give up before the answer
        body = {**CHAT, "model": MODELS[i % 3], "max_tokens": 200, "ignore_eos": True}
        out.append(Case("POST", "/v1/chat/completions", dumps(body), hang_up="wait"))
    while len(out) < 1000:  # valid requests in between
        i = len(out)
        body = (
            {
                **COMPLETION,
                "model": MODELS[i % 3],
                "max_tokens": 1 + i % 3,
                "stream": bool(i % 2),
                "logprobs": i % 4,
            }
            if i % 3
            else {**CHAT, "model": MODELS[i % 3], "n": 1 + i % 2, "temperature": 0.5}
        )
        path = "/v1/completions" if i % 3 else "/v1/chat/completions"
        out.append(Case("POST", path, dumps(body), expect={200}))
    rng.shuffle(out)
    return out


def _chunks(data: bytes) -> Any:
    async def gen() -> Any:
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    return gen


async def send(client: Any, case: Case) -> int | None:
    """The status, or None when the client hung up on purpose (or the server cut a 413 upload)."""
    data = case.data() if callable(case.data) else case.data
    if case.hang_up == "wait":
        try:
            await client.request(
                case.method,
                case.path,
                data=data,
                headers=case.headers,
                timeout=aiohttp.ClientTimeout(total=0.05),
            )
        except asyncio.TimeoutError:
            return None
        return None
    try:
        r = await client.request(case.method, case.path, data=data, headers=case.headers)
    except aiohttp.ClientOSError:
        assert case.expect == {413}  # the server may answer 413 and close mid-upload
        return None
    if case.hang_up == "stream":
        await r.content.readuntil(b"\n\n")
        r.close()
        return None
    await r.read()
    return r.status


def test_a_thousand_hostile_requests(serve, engine):
    all_cases = cases(random.Random(0))
    assert len(all_cases) == 1000

    async def body(client):
        sem = asyncio.Semaphore(32)

        async def one(case: Case) -> tuple[Case, int | None]:
            async with sem:
                return case, await send(client, case)

        results = await asyncio.gather(*(one(c) for c in all_cases))
        health = await client.get("/health")
        await until(lambda: not engine.has_work(), 5, "the aborts")  # they land within a step
        metrics = await (await client.get("/metrics")).text()
        return results, health.status, metrics

    results, health, metrics = serve(body)
    statuses = Counter(s for _, s in results)
    unexpected = [
        (c.method, c.path, str(c.data)[:200], s)
        for c, s in results
        if s is not None and s not in c.expect
    ]
    assert not unexpected, (unexpected[:5], statuses)
    assert 500 not in statuses
    assert statuses[200] > 250 and statuses[400] > 400
    assert health == 200
    m = samples(metrics)
    free, total = (
        value(m, k, mesh="local") for k in ("muxserve_kv_blocks_free", "muxserve_kv_blocks_total")
    )
    assert free == total > 0
    assert not [
        k for k in m if k[0] == "muxserve_http_responses_total" and ("status", "500") in k[1]
    ]
    wait_idle(engine)
