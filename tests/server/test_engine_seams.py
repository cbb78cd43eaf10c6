"""What the server relies on from the engine: abort leaves nothing, closed loops, is_running."""

from __future__ import annotations

import asyncio

import pytest

from muxserve.output_processor import OutputSink, RequestOutput
from muxserve.sampling_params import SamplingParams
from tests.helpers.server import wait_idle
from tests.helpers.wait import wait_until


async def first_output(engine, request_id: str) -> RequestOutput:
    async for out in engine.stream(request_id):
        return out
    raise AssertionError("a stream with no output")


def test_abort_drops_unread_outputs(engine):
    """A reader that went away leaves no outputs behind, finished or not; a reader who is
    merely late still finds them."""
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    running = engine.add_request("llama-demo", [5] * 10, params)
    done, late = (
        engine.add_request("llama-demo", [5] * 10, SamplingParams(max_tokens=1)) for _ in range(2)
    )
    wait_until(
        lambda: engine.scheduler.get(done) is None and engine.scheduler.get(late) is None,
        30,
        "the short requests to finish, unread",
    )
    out = asyncio.run(first_output(engine, late))  # kept for a reader who comes late
    assert (out.request_id, out.finished, out.completion_tokens) == (late, True, 1)
    assert engine.abort(running)
    assert not engine.abort(done)  # finished: nothing to abort; its outputs are dropped anyway
    wait_idle(engine)
    for rid in (running, done, late):  # nothing left to read
        with pytest.raises(KeyError, match="unknown request"):
            asyncio.run(first_output(engine, rid))


def test_is_running(engine, idle_engine):
    assert engine.is_running
    assert not idle_engine.is_running


def test_a_sink_whose_reader_loop_closed_does_not_raise():
    sink = OutputSink()

    async def read_nothing() -> None:
        task = asyncio.ensure_future(sink.get())
        await asyncio.sleep(0)
        task.cancel()

    asyncio.run(read_nothing())  # binds the sink to a loop that is now closed
    out = RequestOutput("r", "m", "", (), (), True, "stop", 1, 0)
    sink.put(out)  # the engine thread would call this: it must not raise
    assert sink.drain() == [out]
