"""A failing engine loop ends every open request with an error and refuses new ones."""

from __future__ import annotations

import asyncio

import pytest

from muxserve.demo import default_config
from muxserve.engine import MuxEngine
from muxserve.errors import EngineStoppedError
from muxserve.sampling_params import SamplingParams


def test_loop_failure_fails_open_requests_and_refuses_new_ones(demo_models, monkeypatch):
    engine = MuxEngine.from_config(default_config(progress=False))

    def broken_schedule() -> list:
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(engine.scheduler, "schedule", broken_schedule)

    async def run() -> list:
        rid = engine.add_request("llama-demo", "hello", SamplingParams(max_tokens=4))
        engine.start()
        return [o async for o in engine.stream(rid)]

    outs = asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert [o.finished for o in outs] == [True]
    assert outs[0].finish_reason == "error"
    assert "scheduler bug" in (outs[0].error or "")
    assert not engine.is_running
    with pytest.raises(EngineStoppedError):
        engine.add_request("llama-demo", "hello again")
    engine.shutdown()
