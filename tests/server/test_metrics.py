"""/metrics (Prometheus text, one registry per app) and /health, also while models compute."""

from __future__ import annotations

import asyncio
import os
import time

from tests.helpers.server import run_app, samples, value
from tests.helpers.wait import until


def test_counters_histograms_and_gauges(serve, engine):
    async def body(client):
        r = await client.post(
            "/v1/completions",
            json={
                "model": "qwen-demo",
                "prompt": [5, 6, 7],
                "max_tokens": 4,
                "n": 2,
                "ignore_eos": True,
            },
        )
        assert r.status == 200
        await client.post("/v1/completions", json={"model": "qwen-demo", "prompt": 5})
        m = await client.get("/metrics")
        assert m.headers["Content-Type"].startswith("text/plain")
        return await m.text()

    m = samples(serve(body))
    q = {"model_name": "qwen-demo"}
    assert value(m, "muxserve:prompt_tokens_total", **q) == 6  # per engine request
    assert value(m, "muxserve:generation_tokens_total", **q) == 8
    assert value(m, "muxserve:request_success_total", finished_reason="length", **q) == 2
    assert value(m, "muxserve:time_to_first_token_seconds_count", **q) == 2
    assert value(m, "muxserve:inter_token_latency_seconds_count", **q) == 6
    assert value(m, "muxserve:e2e_request_latency_seconds_count", **q) == 2
    for name in ("queue", "prefill", "decode", "inference"):
        assert value(m, f"muxserve:request_{name}_time_seconds_count", **q) == 2, name
    assert value(m, "muxserve:request_prompt_tokens_count", **q) == 2
    assert value(m, "muxserve:request_prompt_tokens_sum", **q) == 6
    assert value(m, "muxserve:request_generation_tokens_sum", **q) == 8
    assert value(m, "muxserve:request_params_n_sum", **q) == 2
    assert value(m, "muxserve:request_params_max_tokens_sum", **q) == 4
    # every finished request spent its e2e time in queue + prefill + decode (and the HTTP hop)
    parts = sum(
        value(m, f"muxserve:request_{n}_time_seconds_sum", **q)
        for n in ("queue", "prefill", "decode")
    )
    assert 0 < parts <= value(m, "muxserve:e2e_request_latency_seconds_sum", **q)
    assert value(m, "muxserve_http_responses_total", route="/v1/completions", status="200") == 1
    assert value(m, "muxserve_http_responses_total", route="/v1/completions", status="400") == 1
    pool = engine.scheduler.pool
    mesh = {"mesh": "local"}  # the one engine of a config without a plan
    assert value(m, "muxserve_kv_blocks_total", **mesh) == pool.num_blocks
    assert value(m, "muxserve_kv_blocks_free", **mesh) == pool.num_blocks
    assert value(m, "muxserve_mesh_up", **mesh) == 1
    assert value(m, "muxserve_mesh_restarts_total", **mesh) == 0
    assert value(m, "muxserve_mesh_requests_resubmitted_total", **mesh) == 0
    for model, s in engine.stats().items():
        labels = {"model_name": model, **mesh}
        assert value(m, "muxserve:num_requests_running", **labels) == 0
        assert value(m, "muxserve:num_requests_waiting", **labels) == 0
        assert value(m, "muxserve:kv_cache_usage_perc", **labels) == 0
        assert value(m, "muxserve:num_preemptions_total", **labels) == s.preemptions
        assert value(m, "muxserve_kv_blocks_used", model=model, **mesh) == 0
        assert value(m, "muxserve_kv_blocks_quota", model=model, **mesh) == s.blocks_quota
    # every vLLM-named series exists, for every model, labelled model_name
    names = {n for n, _ in m}
    for family in VLLM_NAMES:
        assert family in names, family
        labelled = {dict(k).get("model_name") for n, k in m if n == family}
        assert labelled >= {"llama-demo", "qwen-demo", "mistral-demo"}, family


VLLM_NAMES = (
    "muxserve:num_requests_running",
    "muxserve:num_requests_waiting",
    "muxserve:kv_cache_usage_perc",
    "muxserve:num_preemptions_total",
    "muxserve:prompt_tokens_total",
    "muxserve:generation_tokens_total",
    "muxserve:time_to_first_token_seconds_count",
    "muxserve:inter_token_latency_seconds_count",
    "muxserve:e2e_request_latency_seconds_count",
    "muxserve:request_queue_time_seconds_count",
    "muxserve:request_prefill_time_seconds_count",
    "muxserve:request_decode_time_seconds_count",
    "muxserve:request_inference_time_seconds_count",
    "muxserve:request_prompt_tokens_count",
    "muxserve:request_generation_tokens_count",
    "muxserve:request_params_n_count",
    "muxserve:request_params_max_tokens_count",
)


def test_kv_usage_and_preemptions_follow_the_engine(serve, engine):
    """While a request holds blocks, kv_cache_usage_perc is its share of the pool."""

    async def body(client):
        task = asyncio.create_task(
            client.post(
                "/v1/completions",
                json={
                    "model": "mistral-demo",
                    "prompt": "x",
                    "max_tokens": 400,
                    "ignore_eos": True,
                },
            )
        )
        await until(lambda: engine.stats()["mistral-demo"].blocks_used > 0, 10, "the request")
        m = samples(await (await client.get("/metrics")).text())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return m

    m = serve(body)
    labels = {"model_name": "mistral-demo", "mesh": "local"}
    used = value(m, "muxserve_kv_blocks_used", model="mistral-demo", mesh="local")
    total = value(m, "muxserve_kv_blocks_total", mesh="local")
    assert used > 0
    assert value(m, "muxserve:kv_cache_usage_perc", **labels) == used / total
    assert value(m, "muxserve:num_requests_running", **labels) == 1


def test_each_app_has_its_own_registry(serve):
    async def one_request(client):
        await client.post(
            "/v1/completions", json={"model": "llama-demo", "prompt": "a", "max_tokens": 1}
        )
        return samples(await (await client.get("/metrics")).text())

    first, second = serve(one_request), serve(one_request)
    key = "muxserve:request_success_total"
    assert value(first, key, finished_reason="length", model_name="llama-demo") == 1
    assert value(second, key, finished_reason="length", model_name="llama-demo") == 1


def test_health_and_metrics_answer_while_models_compute(serve, engine):
    async def body(client):
        busy = [
            asyncio.create_task(
                client.post(
                    "/v1/completions",
                    json={"model": m, "prompt": "x", "max_tokens": 300, "n": 8, "ignore_eos": True},
                )
            )
            for m in ("llama-demo", "qwen-demo", "mistral-demo")
        ]
        await until(
            lambda: sum(s.running for s in engine.stats().values()) >= 8, 30, "8 running requests"
        )
        worst = 0.0
        running = []
        for _ in range(10):
            t = time.perf_counter()
            health = await client.get("/health")
            metrics = samples(await (await client.get("/metrics")).text())
            worst = max(worst, time.perf_counter() - t)
            assert health.status == 200
            running.append(
                sum(v for (n, _), v in metrics.items() if n == "muxserve:num_requests_running")
            )
        for t in busy:
            t.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        return worst, running

    worst, running = serve(body)
    assert max(running) > 0  # measured while requests ran
    assert worst < 1.0  # a step is a few ms; nothing waits for the 300 tokens


def test_health_is_503_when_the_engine_loop_is_not_running(idle_engine):
    async def body(client):
        r = await client.get("/health")
        return r.status, await r.json()

    status, health = run_app(idle_engine, body)
    assert status == 503
    assert health["status"] == "down"
    assert health["meshes"]["local"]["status"] == "stopped"
    assert health["meshes"]["local"]["models"] == ["mistral-demo"]
    assert health["meshes"]["local"]["error"] == "the engine loop is not running"


def test_health_lists_the_engine_as_one_mesh(serve):
    async def body(client):
        r = await client.get("/health")
        return r.status, await r.json()

    status, health = serve(body)
    assert status == 200
    assert health["status"] == "ok"
    (name,) = health["meshes"]
    local = health["meshes"][name]
    assert (name, local["status"], local["pid"], local["restarts"]) == (
        "local",
        "ok",
        os.getpid(),
        0,
    )
    assert local["models"] == ["llama-demo", "qwen-demo", "mistral-demo"]
