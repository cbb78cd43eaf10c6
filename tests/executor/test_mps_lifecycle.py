"""Worker processes that come and go with the demand (issue 15): lazy workers start at a
model's first job, idle ones stop and start again at the next, and neither counts as degraded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from muxserve.engine import MuxEngine
from muxserve.errors import ConfigError, WorkerFailedError
from muxserve.executor.lifecycle import WorkerLifecycle
from muxserve.executor.messages import WorkerInit
from muxserve.executor.worker_unit import GroupState
from muxserve.output_processor import RequestOutput
from muxserve.scheduler.job import Phase
from tests.helpers.engine import GREEDY, hf_greedy, make_config, prompts_for
from tests.helpers.mps import mps_config, mps_engine_of, tokens_of
from tests.helpers.wait import wait_until

MODELS = ("llama-demo", "qwen-demo")


def generate(engine: MuxEngine, model: str, prompt: list[int]) -> list[int]:
    """Greedy tokens of one request; asserts /health never counted its start as degraded."""
    rid = engine.add_request(model, prompt, GREEDY)
    starting_seen: list[dict[str, str]] = []

    async def read() -> list[RequestOutput]:
        outs = []
        async for o in engine.stream(rid):
            outs.append(o)
        return outs

    async def watch(task: asyncio.Task[list[RequestOutput]]) -> None:
        while not task.done():
            groups = engine.executor.groups.values()  # type: ignore[attr-defined]
            if any(g.state is GroupState.STARTING for g in groups):
                starting_seen.append(engine.degraded())
            await asyncio.sleep(0.01)  # sampling /health while the request runs

    async def both() -> list[RequestOutput]:
        task = asyncio.create_task(read())
        await watch(task)
        return await task

    outs = asyncio.run(both())
    assert outs[-1].error is None
    assert all(d == {} for d in starting_seen), starting_seen
    return tokens_of(outs)


def test_lazy_workers_start_at_a_models_first_job_and_idle_ones_stop(
    demo_models: dict[str, Path],
) -> None:
    config = mps_config(demo_models, *MODELS, worker_start="lazy", worker_idle_stop_s=1.0)
    with mps_engine_of(config) as (engine, executor):
        # 1. nothing runs before a model is asked for
        assert all(pids == [] for pids in executor.worker_pids().values())
        engine.start()
        want = [list(t) for t in hf_greedy("llama-demo", demo_models["llama-demo"])[:2]]
        assert generate(engine, "llama-demo", prompts_for("llama-demo")[0]) == want[0]
        pids = executor.worker_pids()
        first = pids[("llama-demo", Phase.PREFILL)] + pids[("llama-demo", Phase.DECODE)]
        assert len(first) in (1, 2)  # the prefill workers may have stopped already (idle)
        assert pids[("qwen-demo", Phase.PREFILL)] == pids[("qwen-demo", Phase.DECODE)] == []

        # 2. idle past worker_idle_stop_s: the workers stop (the engine has no work meanwhile)
        wait_until(lambda: executor.idle_stops == 2, 30.0, "idle workers stopped")
        assert all(pids == [] for pids in executor.worker_pids().values())
        # they exit while the loop goes on (not waited for), and are reaped soon after
        wait_until(
            lambda: all(not Path(f"/proc/{p}").exists() for p in first), 30.0, "workers reaped"
        )
        assert engine.degraded() == {}

        # 3. the next request starts them again, with nothing left of the last ones
        assert generate(engine, "llama-demo", prompts_for("llama-demo")[1]) == want[1]
        again = executor.worker_pids()[("llama-demo", Phase.DECODE)]
        assert len(again) == 1 and again[0] not in first
        wait_until(lambda: engine.scheduler.jobs_in_flight == 0, 60.0, "idle")
        assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks
    assert all(pids == [] for pids in executor.worker_pids().values())


def test_eager_workers_are_the_default_and_never_stop_when_no_idle_limit_is_set(
    demo_models: dict[str, Path],
) -> None:
    config = make_config(demo_models, executor="mps")
    assert (config.engine.worker_start, config.engine.worker_idle_stop_s) == ("eager", None)
    assert WorkerLifecycle().idle_expired(0.0, 1e9) is False


def test_an_eager_engine_whose_worker_cannot_start_fails_naming_it(
    demo_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every group starts and is waited for; the engine fails naming the one whose worker
    could not start, and no worker is left (the ready ones are stopped too)."""
    from muxserve.executor import worker_unit
    from muxserve.executor.worker_group import WorkerGroup

    real_send, real_start = worker_unit.send_init, WorkerGroup.start
    pids: list[int] = []

    def break_decode(conn, init) -> None:  # type: ignore[no-untyped-def]
        if isinstance(init, WorkerInit) and init.phase is Phase.DECODE:
            init = "not an init"
        real_send(conn, init)

    def start(group: WorkerGroup) -> None:
        real_start(group)
        pids.extend(p.pid for p in group.procs if p.pid is not None)

    monkeypatch.setattr(worker_unit, "send_init", break_decode)
    monkeypatch.setattr(WorkerGroup, "start", start)
    with pytest.raises(WorkerFailedError) as failed:
        MuxEngine(mps_config(demo_models, "llama-demo"))
    assert str(failed.value) == (
        "llama-demo/decode: could not start: TypeError: expected WorkerInit, got str"
    )
    assert len(pids) == 2
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]


@pytest.mark.parametrize(
    ("field", "value"),
    [("worker_start", "sometimes"), ("worker_idle_stop_s", 0.0), ("job_stall_s", 0.0)],
)
def test_bad_worker_settings_are_refused_naming_the_key(
    demo_models: dict[str, Path], field: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=f"engine.{field}"):
        make_config(demo_models, executor="mps", **{field: value})


def test_lifecycle_refuses_a_non_positive_idle_limit() -> None:
    with pytest.raises(ValueError, match="idle_stop_s must be positive"):
        WorkerLifecycle(idle_stop_s=-1.0)
    assert WorkerLifecycle(idle_stop_s=2.0).idle_expired(10.0, 12.0)
    assert not WorkerLifecycle(idle_stop_s=2.0).idle_expired(10.0, 11.9)
