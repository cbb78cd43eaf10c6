"""The mps executor tests' engines (tests/executor/): a config of some demo models with worker
processes, an engine shut down however its test ends, and its requests' streams read out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from muxserve.config import MuxConfig, parse_config
from muxserve.engine import MuxEngine
from muxserve.executor.mps import MpsExecutor
from muxserve.output_processor import RequestOutput
from tests.helpers.engine import make_config

SHM = Path("/dev/shm")  # where shared memory lives: a leak shows as a file left here
# shares that let jobs of different models run at once (at most 100% + 10% in total)
SHARES = {"prefill": 0.5, "decode": 0.3}


def mps_config(
    demo_models: dict[str, Path],
    *models: str,
    sm_share: dict[str, float] | None = None,
    **engine: object,
) -> MuxConfig:
    """tests/test_engine.py's config with the mps executor and `engine`'s settings, of only
    `models` (none named: all three), each with `sm_share` (None: the default, 1.0)."""
    raw = make_config(demo_models, executor="mps", **engine).model_dump()
    if models:
        raw["models"] = [m for m in raw["models"] if m["name"] in models]
    if sm_share is not None:
        for m in raw["models"]:
            m["sm_share"] = sm_share
    return parse_config(raw)


@contextmanager
def mps_engine_of(config: MuxConfig) -> Iterator[tuple[MuxEngine, MpsExecutor]]:
    """An engine of `config` (mps executor) and its executor, shut down at the end, so no
    worker process outlives the test, however it ends."""
    engine = MuxEngine(config)
    try:
        executor = engine.executor
        assert isinstance(executor, MpsExecutor)
        yield engine, executor
    finally:
        engine.shutdown()


def streamed(engine: MuxEngine, rids: list[str]) -> list[list[RequestOutput]]:
    """Each request's outputs, read from its stream (the engine's loop runs them)."""

    async def read(rid: str) -> list[RequestOutput]:
        return [o async for o in engine.stream(rid)]

    async def all_of() -> list[list[RequestOutput]]:
        return list(await asyncio.gather(*(read(r) for r in rids)))

    return asyncio.run(all_of())


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    """A request's tokens, from its streamed outputs."""
    return [t for o in outs for t in o.token_ids]
