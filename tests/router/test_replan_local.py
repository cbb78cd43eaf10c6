"""Issue 15's acceptance: a re-plan applied during a stream of requests fails none of them.

Two CPU meshes (child processes, the local launcher): mesh-a serves llama and mistral,
mesh-b serves qwen and lists mistral as standby (asleep). A client sends llama and mistral
at about 4 req/s each through HTTP; the router sees both rates far above the plan's, and
the planner, on a cost model of two slow GPUs where the hot pair cannot share one, moves
mistral to mesh-b: woken there, new requests switched, mesh-a drained, mistral put to sleep
there. Every request gets its full answer, and the same greedy text on either mesh.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from muxserve.client.protocol import ModelState
from muxserve.router.local import LocalLauncher
from muxserve.router.replan import Replanner
from muxserve.router.router import Router
from muxserve.server.app import create_app
from muxserve.server.background import BackgroundServer
from placement.replanning import PlacementPlanner
from tests.router.conftest import LLAMA, MISTRAL, QWEN, tiny_gpu_cluster, two_mesh_config
from tests.router.test_router_local import wait_for

TOKENS = 16
PROMPT = "Once upon a time there was a small garden by the river where the old man worked"
PERIOD_S = 0.25  # per model: ~4 req/s each of llama and mistral
AFTER_MOVE = 8  # mistral requests sent after the move (they go to mesh-b)


def complete(port: int, model: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        body = {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        r = conn.getresponse()
        return {"status": r.status, **json.loads(r.read())}
    finally:
        conn.close()


def stream_until_moved(
    port: int, replanner: Replanner, after_move: int = AFTER_MOVE
) -> list[tuple[str, dict[str, Any]]]:
    """Send llama and mistral at ~4 req/s each until a round has moved a model and
    `after_move` more mistral requests were sent; every (model, response)."""
    futures: list[tuple[str, Future[dict[str, Any]]]] = []
    with ThreadPoolExecutor(max_workers=32) as pool:
        deadline = time.monotonic() + 120
        moved_at: int | None = None
        while moved_at is None or sum(m == MISTRAL for m, _ in futures) < moved_at + after_move:
            assert time.monotonic() < deadline, f"no move after 120 s: {replanner.history}"
            for model in (LLAMA, MISTRAL):
                futures.append((model, pool.submit(complete, port, model)))
            if moved_at is None and any(c.moves for c in replanner.history):
                moved_at = sum(m == MISTRAL for m, _ in futures)
            time.sleep(PERIOD_S)  # the client's pace: this is the load, not a wait
        return [(m, f.result(timeout=120)) for m, f in futures]


def check_all_served(results: list[tuple[str, dict[str, Any]]]) -> None:
    """Every request got its full answer, and each model one greedy text on either mesh."""
    failed = [(m, r) for m, r in results if r["status"] != 200]
    assert failed == []
    assert all(r["usage"]["completion_tokens"] == TOKENS for _, r in results)
    texts = {
        m: {r["choices"][0]["text"] for mm, r in results if mm == m} for m in (LLAMA, MISTRAL)
    }
    assert all(len(t) == 1 for t in texts.values()), texts


def test_a_replan_during_a_stream_fails_no_request(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    config = two_mesh_config(
        demo_models,
        tiny_gpu_cluster(tmp_path / "cluster.yaml"),
        window_s=4.0,
        interval_s=600.0,  # only drift re-plans here
        drift=0.5,
        rate_floor=0.5,
        check_s=0.25,
        time_limit_s=10.0,
    )
    assert config.router.replan is not None
    planner = PlacementPlanner(config, config.router.replan)
    router = Router(config, LocalLauncher(), planner=planner)
    replanner = router.replanner
    assert replanner is not None
    server = BackgroundServer(create_app(router))
    server.start()  # returns once both meshes serve
    port = int(server.port)
    try:
        assert router.meshes["mesh-b"].client.model_states()[MISTRAL] is ModelState.ASLEEP
        check_all_served(stream_until_moved(port, replanner))
        moves = [mv for c in replanner.history for mv in c.moves]
        assert moves == [(MISTRAL, "mesh-a", "mesh-b")]
        change = next(c for c in replanner.history if c.moves)
        assert change.decision is not None and change.decision.take
        assert change.rates_after[MISTRAL] > 1.0 and change.rates_after[LLAMA] > 1.0
        assert router.routing.assignment() == {
            LLAMA: ("mesh-a",),
            MISTRAL: ("mesh-b",),
            QWEN: ("mesh-b",),
        }
        a, b = router.meshes["mesh-a"].client, router.meshes["mesh-b"].client
        wait_for(
            "mistral asleep on mesh-a",
            lambda: a.model_states().get(MISTRAL) is ModelState.ASLEEP,
            30,
        )
        assert b.model_states()[MISTRAL] is ModelState.AWAKE
        assert router.routing.inflight() == {}
    finally:
        server.stop()
    assert all(p.pid is None for p in (router.meshes[m].process for m in ("mesh-a", "mesh-b")))
