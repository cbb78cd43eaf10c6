"""What the server relies on from the engine: abort leaves nothing, closed loops, is_running."""

from __future__ import annotations

import asyncio
import time

from muxserve.output_processor import OutputSink, RequestOutput
from muxserve.sampling_params import SamplingParams
from tests.server.conftest import wait_idle


def test_abort_drops_unread_outputs(engine):
    """A reader that went away leaves no sink behind, finished or not."""
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    running = engine.add_request("llama-demo", [5] * 10, params)
    done = engine.add_request("llama-demo", [5] * 10, SamplingParams(max_tokens=1))
    while engine.scheduler.get(done) is not None:  # `done` finishes, unread
        time.sleep(0.001)
    assert done in engine._sinks  # kept for a reader who may still come
    assert engine.abort(running)
    assert not engine.abort(done)  # finished: nothing to abort; its outputs are dropped anyway
    wait_idle(engine)
    assert not set(engine._sinks) & {running, done}


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
