"""Issue 10 on the local launcher, through HTTP: a plan's three meshes as child processes.

The router is started once for the module (each mesh takes seconds to load); the tests run in
file order and leave every mesh serving, except the last, which shuts the router down.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from muxserve.engine import MuxEngine
from muxserve.router.local import LocalLauncher
from muxserve.router.router import Router
from muxserve.sampling_params import SamplingParams
from muxserve.server.app import create_app
from muxserve.server.background import BackgroundServer
from muxserve.server.chat import render
from tests.router.conftest import MESHES, demo_plan

T = TypeVar("T")

PROMPTS = ["Once upon a time", "The quick brown fox"]
CHAT = [{"role": "user", "content": "Tell me a story"}]
TOKENS = 12
GREEDY = {"max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
LONG = {"max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
POOL_BLOCKS = (8 << 20) // 4096  # DEMO_ENGINE's kv_pool_bytes / block_bytes, per mesh
RESTART_S = 60.0  # the bound on a killed mesh coming back


# ---- talking to the server --------------------------------------------------------------------
def connect(port: int, timeout: float = 30.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    conn = connect(port)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get_json(port: int, path: str) -> dict[str, Any]:
    status, data = call(port, "GET", path)
    assert status in (200, 503), data
    return dict(json.loads(data))


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, data = call(port, "POST", path, body)
    return status, json.loads(data)


def sse(data: bytes) -> list[Any]:
    """The payloads of an SSE body ("[DONE]" as a string); asserts the framing is whole."""
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def open_stream(port: int, model: str) -> tuple[http.client.HTTPConnection, Any]:
    """A long streamed completion, its first event already read."""
    conn = connect(port, timeout=10.0)
    body = {"model": model, "prompt": PROMPTS[0], **LONG}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = b""
    while not first.endswith(b"\n\n"):
        first += resp.read(1)
    assert first.startswith(b"data: {")
    return conn, resp


def completion(port: int, model: str, prompt: str) -> tuple[int, dict[str, Any]]:
    return post(port, "/v1/completions", {"model": model, "prompt": prompt, **GREEDY})


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as (name, sorted labels) -> value."""
    status, data = call(port, "GET", "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(data.decode())
        for s in family.samples
    }


def wait_for(what: str, cond: Callable[[], T | None], timeout: float) -> T:
    """`cond()` once it is truthy; fails after `timeout` s. Polls: HTTP has no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.02)


# ---- processes ---------------------------------------------------------------------------------
def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def state_of(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None once it is gone (reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def running(pid: int) -> bool:
    return state_of(pid) not in (None, "Z", "X")


def shm_entries_of_others(names: set[str], ours: set[int]) -> set[str]:
    """Entries naming a live process that is not ours: other users' of this machine."""
    others = set()
    for name in names:
        pids = {int(x) for x in "".join(c if c.isdigit() else " " for c in name).split()}
        if any(p not in ours and running(p) for p in pids):
            others.add(name)
    return others


# ---- the served plan ---------------------------------------------------------------------------
@dataclass
class Served:
    router: Router
    server: BackgroundServer
    shm_before: set[str]
    pids: set[int] = field(default_factory=set)  # every mesh process seen, killed ones too

    @property
    def port(self) -> int:
        return int(self.server.port)

    def health(self) -> dict[str, Any]:
        h = get_json(self.port, "/health")
        self.pids |= {m["pid"] for m in h["meshes"].values() if m["pid"] is not None}
        return h

    def wait_ok(self) -> dict[str, Any]:
        return wait_for("every mesh ok", lambda: (h := self.health())["status"] == "ok" and h, 60)


@pytest.fixture(scope="module")
def served(demo_models: dict[str, Path]) -> Iterator[Served]:
    shm_before = set(os.listdir("/dev/shm"))
    router = Router(demo_plan(demo_models), LocalLauncher())
    server = BackgroundServer(create_app(router))
    server.start()  # returns once every mesh serves
    s = Served(router, server, shm_before)
    try:
        s.health()
        yield s
    finally:
        server.stop()


@pytest.fixture(scope="module")
def expected(demo_models: dict[str, Path]) -> dict[tuple[str, str], str]:
    """Greedy text of every (model, prompt or "chat") from one in-process engine serving all."""
    config = demo_plan(demo_models).model_copy(update={"meshes": None})
    with MuxEngine(config) as engine:
        keys, prompts = [], []
        for model in MESHES.values():
            for p in PROMPTS:
                keys.append((model, p))
                prompts.append(p)
            keys.append((model, "chat"))
            prompts.append(render(engine.models[model].tokenizer, CHAT, True))
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        done = engine.generate(prompts, params, [m for m, _ in keys])
        assert all(len(c.token_ids) == TOKENS for c in done)
        return {k: c.text for k, c in zip(keys, done, strict=True)}


def serves_as_the_engine(port: int, model: str, expected: dict[tuple[str, str], str]) -> None:
    """Completions and chat, streamed and not, give the engine's greedy text."""
    status, body = post(port, "/v1/completions", {"model": model, "prompt": PROMPTS, **GREEDY})
    assert status == 200, body
    assert [c["text"] for c in body["choices"]] == [expected[(model, p)] for p in PROMPTS]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 2 * TOKENS

    status, data = call(
        port,
        "POST",
        "/v1/completions",
        {"model": model, "prompt": PROMPTS, **GREEDY, "stream": True},
    )
    assert status == 200
    texts = ["", ""]
    for event in sse(data)[:-1]:
        for c in event["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == [expected[(model, p)] for p in PROMPTS]

    status, body = post(port, "/v1/chat/completions", {"model": model, "messages": CHAT, **GREEDY})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected[(model, "chat")]

    chat = {"model": model, "messages": CHAT, **GREEDY, "stream": True}
    status, data = call(port, "POST", "/v1/chat/completions", chat)
    assert status == 200
    events = sse(data)[:-1]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == expected[(model, "chat")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


# ---- the tests, in order ------------------------------------------------------------------------
def test_three_mesh_processes_children_of_this_one(served):
    health = served.health()
    assert health["status"] == "ok"
    meshes = health["meshes"]
    assert {n: (m["status"], m["models"], m["restarts"]) for n, m in meshes.items()} == {
        n: ("ok", [model], 0) for n, model in MESHES.items()
    }
    pids = [m["pid"] for m in meshes.values()]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert all(running(p) and parent_of(p) == os.getpid() for p in pids)
    assert {m["node"] for m in meshes.values()} == {os.uname().nodename}


def test_greedy_text_through_the_router_equals_the_engine(served, expected):
    with ThreadPoolExecutor(len(MESHES)) as pool:  # the meshes serve side by side
        list(pool.map(lambda m: serves_as_the_engine(served.port, m, expected), MESHES.values()))


def test_models_lists_every_model(served):
    models = get_json(served.port, "/v1/models")
    assert [m["id"] for m in models["data"]] == list(MESHES.values())
    assert [m["max_model_len"] for m in models["data"]] == [1024, 1024, 1024]


def test_metrics_has_a_series_per_mesh(served):
    got = samples(served.port)
    for mesh, model in MESHES.items():
        assert got[("muxserve_kv_blocks_total", (("mesh", mesh),))] == POOL_BLOCKS
        assert got[("muxserve_mesh_up", (("mesh", mesh),))] == 1.0
        assert got[("muxserve:num_requests_running", (("mesh", mesh), ("model_name", model)))] == 0
    running_series = {labels for name, labels in got if name == "muxserve:num_requests_running"}
    assert running_series == {
        (("mesh", mesh), ("model_name", model)) for mesh, model in MESHES.items()
    }


def test_sleep_and_wake_through_the_router(served, expected):
    """A model put to sleep on its mesh over HTTP is woken by its next request, and serves the
    same text; the router reports its states and the mesh its wake."""
    mesh, model = next(iter(MESHES.items()))
    status, body = post(served.port, f"/v1/models/{model}/sleep", {"level": 2})
    assert status == 200, body
    assert body["state"] == "asleep"
    assert served.router.model_states()[model].value == "asleep"
    state = (("mesh", mesh), ("model_name", model))
    got = samples(served.port)
    assert got[("muxserve:model_state", (*state, ("state", "asleep")))] == 1.0
    assert got[("muxserve:num_requests_running", state)] == 0
    serves_as_the_engine(served.port, model, expected)  # the first request wakes it
    got = samples(served.port)
    assert got[("muxserve:model_state", (*state, ("state", "awake")))] == 1.0
    assert got[("muxserve:model_wakes_total", state)] == 1.0
    status, body = post(served.port, f"/v1/models/{model}/wake", {})
    assert (status, body["state"], body["wake_seconds"]) == (200, "awake", 0.0)
    status, body = post(served.port, "/v1/models/nope/wake", {})
    assert status == 404


def test_client_disconnect_aborts_on_the_mesh(served):
    """The request is gone from its mesh at once, not after its 1000 tokens (seconds here)."""

    def gauge(name: str, *labels: tuple[str, str]) -> float:
        return samples(served.port)[(name, tuple(sorted((("mesh", "mesh-b"), *labels))))]

    def aborted() -> float:
        key = (
            "muxserve:request_success_total",
            (("finished_reason", "abort"), ("model_name", "qwen-demo")),
        )
        return samples(served.port).get(key, 0.0)

    before = aborted()
    conn, resp = open_stream(served.port, "qwen-demo")
    model = ("model_name", "qwen-demo")
    wait_for("running", lambda: gauge("muxserve:num_requests_running", model) == 1.0, 5.0)
    assert gauge("muxserve_kv_blocks_free") < POOL_BLOCKS
    resp.close()
    conn.close()  # the client goes away mid-stream
    assert aborted() == before + 1

    def freed() -> bool:
        return (
            gauge("muxserve:num_requests_running", model) == 0.0
            and gauge("muxserve_kv_blocks_free") == POOL_BLOCKS
        )

    wait_for("aborted on mesh-b", freed, 1.5)


def test_sigkill_of_a_mesh_503_others_serve_then_it_is_back(served, expected):
    victim = served.health()["meshes"]["mesh-b"]["pid"]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_for("dead", lambda: not running(victim), 1.0)
    status, body = completion(served.port, "qwen-demo", PROMPTS[0])
    assert time.monotonic() - t0 < 1.0
    assert status == 503, body
    assert body["error"]["code"] == "mesh_unavailable"
    assert "mesh 'mesh-b'" in body["error"]["message"]

    def down() -> dict[str, Any] | None:
        h = served.health()
        mesh_b = h["meshes"]["mesh-b"]
        said = (mesh_b["status"], mesh_b.get("error"))
        return h if said == ("down", "its process ended with signal SIGKILL") else None

    health = wait_for("mesh-b down", down, 2.0)
    assert health["status"] == "degraded"
    assert {n: m["status"] for n, m in health["meshes"].items()} == {
        "mesh-a": "ok",
        "mesh-b": "down",
        "mesh-c": "ok",
    }
    for _ in range(2):  # the other meshes are untouched
        for model in ("llama-demo", "mistral-demo"):
            for p in PROMPTS:
                status, got = completion(served.port, model, p)
                assert status == 200, got
                assert got["choices"][0]["text"] == expected[(model, p)]

    health = served.wait_ok()
    mesh_b = health["meshes"]["mesh-b"]
    assert mesh_b["restarts"] == 1
    assert mesh_b["pid"] != victim
    assert running(mesh_b["pid"]) and parent_of(mesh_b["pid"]) == os.getpid()
    assert time.monotonic() - t0 < RESTART_S
    serves_as_the_engine(served.port, "qwen-demo", expected)


def test_a_stream_on_a_killed_mesh_ends_with_an_error_event(served):
    victim = served.health()["meshes"]["mesh-c"]["pid"]
    conn, resp = open_stream(served.port, "mistral-demo")
    os.kill(victim, signal.SIGKILL)
    rest = resp.read()  # the socket's 10 s timeout: a hang fails, and a cut raises
    conn.close()
    events = sse(rest)
    error = events[-2]["error"]
    assert (error["type"], error["code"]) == ("server_error", "mesh_unavailable")
    assert "mesh 'mesh-c'" in error["message"]
    assert all("choices" in e for e in events[:-2])
    assert served.wait_ok()["meshes"]["mesh-c"]["restarts"] == 1


def test_shutdown_leaves_no_process_and_no_shared_memory(served):
    pids = {m["pid"] for m in served.health()["meshes"].values()}
    assert len(pids) == 3 and all(running(p) for p in pids)
    served.server.stop()  # the app's cleanup shuts the router down
    assert not [p for p in served.pids if running(p)]
    assert not [p for p in pids if parent_of(p) == os.getpid()]  # reaped, not zombies
    assert {n: m["status"] for n, m in served.router.health().to_json()["meshes"].items()} == {
        n: "stopped" for n in MESHES
    }
    new = set(os.listdir("/dev/shm")) - served.shm_before
    assert new - shm_entries_of_others(new, served.pids | {os.getpid()}) == set()
