"""A mesh engine behind `MeshServer`, reached through `RemoteEngineClient`, all in this process.

Two engines for the module: `engine` runs its loop (parity, refusals, stats); `idle` never runs
it, so its requests move only when a test steps it (what happens to a request that holds
blocks, or waits, is then exact rather than a race with the loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from muxserve.client.in_process import mesh_stats
from muxserve.client.protocol import ModelState
from muxserve.config import parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.errors import (
    EmptyPromptError,
    MeshUnavailableError,
    ModelBusyError,
    ModelDoesNotFitError,
    PromptTooLongError,
    QueueFullError,
    RequestError,
    UnknownModelError,
)
from muxserve.mesh import wire
from muxserve.mesh.messages import MeshInfo, ModelLimits
from muxserve.mesh.remote_client import RemoteEngineClient
from muxserve.mesh.runtime import Endpoint
from muxserve.mesh.server import MeshServer
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.scheduler import ModelStats

T = TypeVar("T")
Body = Callable[[MeshServer, RemoteEngineClient], Awaitable[T]]

MESH = "mesh-x"
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
PROMPTS = ["Once upon a time", "The quick brown fox", "Hello"]
TRAPPED: list[str] = []  # what unpickling a `Trap` appends to


def _trap(tag: str) -> None:
    TRAPPED.append(tag)


class Trap:
    """Unpickling it runs `_trap`: a stand-in for code a hostile frame would run."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_trap, ("unpickled",))


def engine_of(path: Path, name: str, **model: Any) -> MuxEngine:
    return MuxEngine(
        parse_config(
            {"models": [{"name": name, "path": str(path), **model}], "engine": DEMO_ENGINE}
        )
    )


@pytest.fixture(scope="module")
def engine(demo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    eng = engine_of(demo_models["llama-demo"], "llama-demo")
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def idle(demo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    """mistral-demo with a waiting queue of one and no loop: requests move when stepped."""
    eng = engine_of(demo_models["mistral-demo"], "mistral-demo", max_waiting=1)
    yield eng
    eng.shutdown()


def is_idle(engine: MuxEngine) -> bool:
    snap = engine.snapshot()
    return not engine.has_work() and snap.blocks_free == snap.blocks_total


@pytest.fixture(autouse=True)
def nothing_left(engine: MuxEngine, idle: MuxEngine) -> Iterator[None]:
    """Every test leaves both engines with no request and every block free."""
    yield
    deadline = time.monotonic() + 5.0
    while not (is_idle(engine) and is_idle(idle)):
        assert time.monotonic() < deadline, f"left behind: {engine.stats()} {idle.stats()}"
        time.sleep(0.01)
    engine.check_integrity()
    idle.check_integrity()


def serve(engine: MuxEngine, body: Body[T], token: str | None = None) -> T:
    """`body(server, client)` with `engine` behind a MeshServer and a client connected to it."""
    token = token or wire.new_token()

    async def main() -> T:
        server = MeshServer(MESH, engine, token)
        host, port = await server.listen("127.0.0.1", 0)
        client = RemoteEngineClient(MESH, token)
        await client.connect(Endpoint(host, port, os.getpid()))
        try:
            return await body(server, client)
        finally:
            await client.close()
            await server.close()

    return asyncio.run(main())


async def until(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `cond` (engine state has no event to wait on) until true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        await asyncio.sleep(0.005)


async def collect(client: RemoteEngineClient, rid: str) -> list[RequestOutput]:
    return [out async for out in client.stream(rid)]


def ids(engine: MuxEngine, text: str) -> list[int]:
    return next(iter(engine.models.values())).tokenizer.encode(text)


class Reader:
    """A task reading one stream; `first` is set once it holds its first output."""

    def __init__(self, client: RemoteEngineClient, rid: str) -> None:
        self.first = asyncio.Event()
        self.outputs: list[RequestOutput] = []
        self.task = asyncio.create_task(self._read(client, rid))

    async def _read(self, client: RemoteEngineClient, rid: str) -> None:
        async for out in client.stream(rid):
            self.outputs.append(out)
            self.first.set()


async def step_until_first_output(idle: MuxEngine, reader: Reader) -> None:
    """Step the idle engine (prefill) until `reader` has its first output."""
    deadline = time.monotonic() + 5.0
    while not reader.first.is_set():
        assert time.monotonic() < deadline, "no first output"
        await asyncio.to_thread(idle.step)
        await asyncio.wait([asyncio.ensure_future(reader.first.wait())], timeout=0.05)


# ---- the connection ----------------------------------------------------------------------------
def test_connect_returns_what_the_mesh_serves(engine):
    async def body(server: MeshServer, client: RemoteEngineClient) -> MeshInfo | None:
        assert client.connected and client.outstanding == 0
        assert await client.ping(2.0) is True
        return client.info

    info = serve(engine, body)
    assert info == MeshInfo(
        MESH,
        os.getpid(),
        socket.gethostname(),
        {"llama-demo": ModelLimits("float32", 1024)},
        {"llama-demo": ModelState.AWAKE},
    )


def test_greedy_outputs_equal_generate(engine):
    expected = engine.generate(PROMPTS, GREEDY, "llama-demo")

    async def body(server: MeshServer, client: RemoteEngineClient) -> list[list[RequestOutput]]:
        for i, p in enumerate(PROMPTS):
            assert (
                await client.add_request("llama-demo", ids(engine, p), GREEDY, f"r{i}") == f"r{i}"
            )
        assert client.outstanding == len(PROMPTS)
        return await asyncio.gather(*(collect(client, f"r{i}") for i in range(len(PROMPTS))))

    got = serve(engine, body)
    for outs, want in zip(got, expected, strict=True):
        assert "".join(o.text for o in outs) == want.text
        assert [t for o in outs for t in o.token_ids] == want.token_ids
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert (outs[-1].finish_reason, outs[-1].completion_tokens) == ("length", 12)


def test_refusals_keep_their_type_and_message(engine):
    too_long = [5] * 1024  # the whole context, and 12 tokens more asked for

    async def body(server: MeshServer, client: RemoteEngineClient) -> list[Exception]:
        errors = []
        for model, prompt in [
            ("llama-demo", too_long),
            ("nope", [5]),
            ("llama-demo", []),
            ("llama-demo", [1 << 20]),
        ]:
            with pytest.raises(RequestError) as e:
                await client.add_request(model, prompt, GREEDY, "r")
            errors.append(e.value)
        assert client.outstanding == 0  # nothing is left of a refused request
        await client.add_request("llama-demo", [5], GREEDY, "dup")
        with pytest.raises(RequestError, match="a request with id 'dup' is already running"):
            await client.add_request("llama-demo", [5], GREEDY, "dup")
        await collect(client, "dup")
        return errors

    long, unknown, empty, bad_id = serve(engine, body)
    assert (type(long), str(long), long.param) == (
        PromptTooLongError,
        "the prompt has 1024 tokens; llama-demo's context is 1024 tokens",
        "prompt",
    )
    assert (type(unknown), str(unknown), unknown.param) == (
        RequestError,  # the router names the models it serves; the mesh's list is not theirs
        "model 'nope' is not served here; served models: llama-demo",
        "model",
    )
    assert (type(empty), str(empty), empty.param) == (
        EmptyPromptError,
        "the prompt is empty",
        "prompt",
    )
    assert (type(bad_id), bad_id.param) == (RequestError, "prompt")


def test_a_full_queue_is_a_queue_full_error(idle):
    async def body(server: MeshServer, client: RemoteEngineClient) -> QueueFullError:
        await client.add_request("mistral-demo", [5], GREEDY, "waits")
        with pytest.raises(QueueFullError) as e:
            await client.add_request("mistral-demo", [5], GREEDY, "refused")
        client.abort("waits")
        await until("the abort applied", lambda: not idle.has_work())
        return e.value

    err = serve(idle, body)
    assert (type(err), str(err), err.param, err.retry_after) == (
        QueueFullError,
        "mistral-demo: 1 requests already waiting",
        "model",
        1,  # the model has finished nothing yet: no rate to estimate a wait from
    )


def test_a_queue_full_error_keeps_its_retry_after(idle, monkeypatch):
    def full(*args: object) -> str:
        raise QueueFullError("mistral-demo: 40 requests already waiting", "model", 17)

    monkeypatch.setattr(idle, "add_request", full)

    async def body(server: MeshServer, client: RemoteEngineClient) -> QueueFullError:
        with pytest.raises(QueueFullError) as e:
            await client.add_request("mistral-demo", [5], GREEDY, "refused")
        return e.value

    err = serve(idle, body)
    assert (str(err), err.param, err.retry_after) == (
        "mistral-demo: 40 requests already waiting",
        "model",
        17,
    )


# ---- the handshake ------------------------------------------------------------------------------
def test_a_wrong_token_is_refused_and_nothing_is_unpickled(engine):
    token = wire.new_token()

    async def main() -> None:
        server = MeshServer(MESH, engine, token)
        host, port = await server.listen("127.0.0.1", 0)
        try:
            stranger = RemoteEngineClient(MESH, wire.new_token())
            with pytest.raises(wire.HandshakeError, match="closed the connection during the"):
                await stranger.connect(Endpoint(host, port, os.getpid()))
            assert not stranger.connected

            # a peer that answers the challenge wrongly, then sends a frame that runs code
            reader, writer = await asyncio.open_connection(host, port)
            await reader.readexactly(wire.CHALLENGE_BYTES)
            writer.write(bytes(32) + wire.encode(Trap()))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed, nothing sent
            writer.close()
            assert TRAPPED == []

            # the same frame after a right answer is unpickled: the trap works
            reader, writer = await asyncio.open_connection(host, port)
            challenge = await reader.readexactly(wire.CHALLENGE_BYTES)
            answer = hmac.new(bytes.fromhex(token), challenge, hashlib.sha256).digest()
            writer.write(answer + wire.encode(Trap()))
            await writer.drain()
            assert isinstance(await wire.receive(reader), MeshInfo)
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # not a message: closed
            writer.close()
            assert TRAPPED == ["unpickled"]

            client = RemoteEngineClient(MESH, token)  # the mesh still serves the right token
            await client.connect(Endpoint(host, port, os.getpid()))
            assert await client.ping(2.0) is True
            await client.close()
        finally:
            await server.close()
            TRAPPED.clear()

    asyncio.run(main())


# ---- ends ---------------------------------------------------------------------------------------
def test_closing_the_connection_aborts_its_requests(idle):
    async def body(server: MeshServer, client: RemoteEngineClient) -> None:
        await client.add_request("mistral-demo", ids(idle, PROMPTS[0]), LONG, "r")
        reader = Reader(client, "r")
        await step_until_first_output(idle, reader)
        assert idle.stats()["mistral-demo"].running == 1
        assert idle.snapshot().blocks_free < idle.snapshot().blocks_total
        await client.close()  # the router went away
        with pytest.raises(MeshUnavailableError):
            await reader.task
        await until("freed", lambda: is_idle(idle))

    serve(idle, body)


def test_abort_ends_a_stream_being_read_and_frees_the_request(idle):
    async def body(server: MeshServer, client: RemoteEngineClient) -> list[RequestOutput]:
        await client.add_request("mistral-demo", ids(idle, PROMPTS[0]), LONG, "r")
        reader = Reader(client, "r")
        await step_until_first_output(idle, reader)
        client.abort("r")
        await asyncio.wait_for(reader.task, 5.0)
        assert client.outstanding == 0
        await until("aborted on the mesh", lambda: is_idle(idle))
        return reader.outputs

    outs = serve(idle, body)
    assert outs[-1] == RequestOutput("r", "", "", (), (), True, "abort", 0, 0)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]


def test_an_add_request_cancelled_before_its_answer_is_aborted_on_the_mesh(idle):
    async def body(server: MeshServer, client: RemoteEngineClient) -> None:
        task = asyncio.create_task(client.add_request("mistral-demo", [5], GREEDY, "r"))
        await asyncio.sleep(0)  # one turn: the task sends AddRequest and awaits the answer
        assert client.outstanding == 1
        task.cancel()  # the HTTP client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await client.ping(2.0) is False  # the mesh handled everything sent before
        assert not idle.has_work()

    serve(idle, body)


def test_abort_after_the_reader_was_cancelled_reaches_the_mesh(idle):
    async def body(server: MeshServer, client: RemoteEngineClient) -> None:
        await client.add_request("mistral-demo", ids(idle, PROMPTS[0]), LONG, "r")
        reader = Reader(client, "r")
        await step_until_first_output(idle, reader)
        reader.task.cancel()  # aiohttp cancels the handler of a client that went away
        with pytest.raises(asyncio.CancelledError):
            await reader.task
        client.abort("r")  # then Generation.close() aborts what has not finished
        await client.ping(2.0)  # the mesh handled everything sent before
        assert not idle.has_work()

    try:
        serve(idle, body)
    finally:
        idle.abort("r")  # what the mesh should have done


def test_a_closing_server_ends_open_streams_with_mesh_unavailable(idle):
    async def body(server: MeshServer, client: RemoteEngineClient) -> MeshUnavailableError:
        await client.add_request("mistral-demo", ids(idle, PROMPTS[0]), LONG, "r")
        reader = Reader(client, "r")
        await step_until_first_output(idle, reader)
        await server.close()
        with pytest.raises(MeshUnavailableError) as e:
            await asyncio.wait_for(reader.task, 5.0)
        assert not client.connected
        with pytest.raises(MeshUnavailableError):
            await client.add_request("mistral-demo", [5], GREEDY, "after")
        with pytest.raises(MeshUnavailableError):
            await client.stats(2.0)
        await until("aborted by the closing server", lambda: is_idle(idle))
        return e.value

    err = serve(idle, body)
    assert err.mesh == MESH
    assert str(err).startswith(f"mesh {MESH!r} is unavailable: ")


def test_closing_the_server_logs_no_error(engine, caplog):
    """Python 3.11 logs a cancelled connection task's CancelledError as an error."""

    async def body(server: MeshServer, client: RemoteEngineClient) -> None:
        await server.close()
        await client.wait_closed()

    with caplog.at_level(logging.WARNING):
        serve(engine, body)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---- state --------------------------------------------------------------------------------------
def test_stats_are_the_engines(engine, idle):
    async def running_engine(server: MeshServer, client: RemoteEngineClient) -> None:
        assert await client.stats(2.0) == mesh_stats(engine, MESH)
        assert await client.ping(2.0) is True

    async def stopped_engine(server: MeshServer, client: RemoteEngineClient) -> None:
        await client.add_request("mistral-demo", [5, 6, 7], GREEDY, "waits")
        stats = await client.stats(2.0)
        assert stats == mesh_stats(idle, MESH)
        quota = stats.models["mistral-demo"].blocks_quota
        assert stats.models == {"mistral-demo": ModelStats(1, 0, 0, quota)}
        assert stats.blocks_free == stats.blocks_total == (8 << 20) // 4096
        assert await client.ping(2.0) is False  # it answers, but its engine loop is not running
        client.abort("waits")

    serve(engine, running_engine)
    serve(idle, stopped_engine)


# ---- sleep and wake over the wire --------------------------------------------------------------
def test_sleep_and_wake_over_the_wire(engine):
    async def body(server: MeshServer, client: RemoteEngineClient) -> None:
        assert client.model_states() == {"llama-demo": ModelState.AWAKE}
        await client.sleep("llama-demo", 2)
        assert client.model_states() == {"llama-demo": ModelState.ASLEEP}
        stats = await client.stats(2.0)
        assert stats.states == {"llama-demo": ModelState.ASLEEP}
        assert stats.models["llama-demo"].blocks_quota == 0
        took = await client.wake("llama-demo")
        assert took > 0
        assert client.model_states() == {"llama-demo": ModelState.AWAKE}
        assert await client.wake("llama-demo") == 0.0
        stats = await client.stats(2.0)
        assert stats.wakes["llama-demo"].wakes >= 1
        rid = await client.add_request("llama-demo", ids(engine, "Hello"), GREEDY, "after-wake")
        outs = await asyncio.wait_for(collect(client, rid), 30.0)
        assert outs[-1].finished and outs[-1].error is None

    serve(engine, body)


def test_sleep_and_wake_refusals_keep_their_type(engine, idle):
    async def unknown(server: MeshServer, client: RemoteEngineClient) -> None:
        with pytest.raises(UnknownModelError, match="'nope' is not served here"):
            await client.sleep("nope")
        with pytest.raises(UnknownModelError):
            await client.wake("nope")
        with pytest.raises(ValueError, match="level must be 1"):
            await client.sleep("llama-demo", 5)

    async def busy(server: MeshServer, client: RemoteEngineClient) -> None:
        await client.add_request("mistral-demo", [5, 6, 7], GREEDY, "busy")
        with pytest.raises(ModelBusyError) as e:
            await client.sleep("mistral-demo")
        assert e.value.in_flight == 1 and e.value.model == "mistral-demo"
        client.abort("busy")

    serve(engine, unknown)
    serve(idle, busy)


def test_a_wake_that_does_not_fit_keeps_its_numbers(demo_models):
    llama = demo_models["llama-demo"]
    eng = MuxEngine(
        parse_config(
            {
                "models": [
                    {"name": "a", "path": str(llama)},
                    {"name": "b", "path": str(llama), "initial_state": "asleep"},
                ],
                "engine": {**DEMO_ENGINE, "residency": {"min_residency_s": 3600}},
            }
        )
    )
    size = eng.executor.weight_bytes("a")
    eng.shutdown()
    eng = MuxEngine(
        parse_config(
            {
                "models": [
                    {"name": "a", "path": str(llama)},
                    {"name": "b", "path": str(llama), "initial_state": "asleep"},
                ],
                "engine": {
                    **DEMO_ENGINE,
                    "residency": {"weights_budget_bytes": size, "min_residency_s": 3600},
                },
            }
        )
    )

    async def body(server: MeshServer, client: RemoteEngineClient) -> None:
        with pytest.raises(ModelDoesNotFitError) as e:
            await client.wake("b")
        assert (e.value.model, e.value.needed_bytes, e.value.free_bytes) == ("b", size, 0)
        assert e.value.held_by == {"a": size}
        assert client.model_states() == {"a": ModelState.AWAKE, "b": ModelState.ASLEEP}

    try:
        serve(eng, body)
    finally:
        eng.shutdown()


def test_a_request_that_can_never_fit_keeps_its_numbers(demo_models):
    llama = demo_models["llama-demo"]
    models = [
        {"name": "a", "path": str(llama)},
        {"name": "b", "path": str(llama), "initial_state": "asleep"},
    ]
    eng = MuxEngine(parse_config({"models": models, "engine": DEMO_ENGINE}))
    size = eng.executor.weight_bytes("a")
    eng.shutdown()
    residency = {"weights_budget_bytes": size - 1}  # b, as large as a, can never wake
    models[0]["initial_state"] = "asleep"
    eng = MuxEngine(
        parse_config({"models": models, "engine": {**DEMO_ENGINE, "residency": residency}})
    )

    async def body(server: MeshServer, client: RemoteEngineClient) -> None:
        with pytest.raises(ModelDoesNotFitError) as e:
            await client.add_request("b", [1, 2, 3], SamplingParams(max_tokens=2), "r0")
        assert (e.value.model, e.value.needed_bytes, e.value.free_bytes) == ("b", size, size - 1)
        assert e.value.held_by == {}
        assert client.outstanding == 0

    try:
        serve(eng, body)
    finally:
        eng.shutdown()
