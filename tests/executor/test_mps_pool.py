"""Pooled worker processes (`engine.worker_pool: shared`, issue 15): six models share one
prefill and one decode worker, give HF's greedy tokens, detach on sleep (the worker reports
holding none of the model's weights), attach again on wake without a new process, and a killed
or stopped (watchdog) pooled worker's jobs of every model are recomputed with the same tokens
and no process left.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from muxserve.config import MuxConfig, parse_config
from muxserve.engine import MuxEngine
from muxserve.errors import ConfigError, WorkerFailedError
from muxserve.executor.messages import WorkerInit
from muxserve.executor.mps import MpsExecutor
from muxserve.executor.watchdog import JobDeadline
from muxserve.executor.worker_pool import PooledWorker
from muxserve.executor.worker_unit import GroupState
from muxserve.scheduler.job import Phase
from tests.helpers.engine import GREEDY, hf_greedy, make_config, prompts_for
from tests.helpers.mps import mps_config, mps_engine_of, streamed, tokens_of
from tests.helpers.wait import wait_until

BASES = ("llama-demo", "qwen-demo", "mistral-demo")
COPIES = 2  # each demo model under two names: six models
PER_MODEL = 2  # prompts per model


def pooled_config(demo_models: dict[str, Path], **eng: object) -> MuxConfig:
    """The demo models, each under COPIES names, on pooled workers."""
    raw = mps_config(demo_models, worker_pool="shared", **eng).model_dump()
    raw["models"] = [
        {**m, "name": f"{m['name']}-{i}"} for i in range(COPIES) for m in raw["models"]
    ]
    return parse_config(raw)


def base_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def generate_all(engine: MuxEngine, models: list[str]) -> dict[str, list[list[int]]]:
    """PER_MODEL greedy requests per model, all in flight together."""
    pairs = [(m, p) for m in models for p in prompts_for(base_of(m))[:PER_MODEL]]
    outs = engine.generate([p for _, p in pairs], GREEDY, [m for m, _ in pairs])
    got: dict[str, list[list[int]]] = {m: [] for m in models}
    for (m, _), out in zip(pairs, outs, strict=True):
        got[m].append(out.token_ids)
    return got


def want(demo_models: dict[str, Path], model: str) -> list[list[int]]:
    base = base_of(model)
    return [list(t) for t in hf_greedy(base, demo_models[base])[:PER_MODEL]]


def label(executor: MpsExecutor, phase: Phase) -> str:
    """The label of the (one) pooled worker of `phase`."""
    return executor.groups[("llama-demo-0", phase)].label


def pool_pids(executor: MpsExecutor) -> set[int]:
    return {pid for pids in executor.worker_pids().values() for pid in pids}


@pytest.fixture(scope="module")
def pooled(demo_models: dict[str, Path]) -> MuxEngine:
    engine = MuxEngine(pooled_config(demo_models))
    yield engine
    executor = engine.executor
    pids = pool_pids(executor)  # type: ignore[arg-type]
    engine.shutdown()
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]  # nothing leaks


def test_six_models_share_two_workers_and_give_hf_greedy_output(
    pooled: MuxEngine, demo_models: dict[str, Path]
) -> None:
    executor = pooled.executor
    assert isinstance(executor, MpsExecutor)
    units = {id(u): u for u in executor.groups.values()}
    assert len(units) == 2  # one prefill, one decode worker (one SM-share class)
    assert all(isinstance(u, PooledWorker) for u in units.values())
    assert len(pool_pids(executor)) == 2
    got = generate_all(pooled, list(pooled.models))
    for model, tokens in got.items():
        assert tokens == want(demo_models, model), model
    report = executor.worker_report()
    assert sorted(report) == sorted(u.label for u in units.values())
    names = [[n for n, _ in r.models] for r in report.values()]
    assert names == [sorted(pooled.models)] * 2


def test_sleep_detaches_and_wake_attaches_to_the_running_workers(
    pooled: MuxEngine, demo_models: dict[str, Path]
) -> None:
    executor = pooled.executor
    assert isinstance(executor, MpsExecutor)
    pids = pool_pids(executor)
    held = {n: b for n, b in executor.worker_report()[label(executor, Phase.DECODE)].models}
    pooled.sleep("qwen-demo-0", level=1)
    for name, report in executor.worker_report().items():
        # the model is gone from both workers; the others are untouched
        assert dict(report.models) == {n: b for n, b in held.items() if n != "qwen-demo-0"}, name
    assert pool_pids(executor) == pids  # the workers stayed up
    pooled.sleep("llama-demo-1", level=2)
    assert "llama-demo-1" not in dict(
        executor.worker_report()[label(executor, Phase.PREFILL)].models
    )

    pooled.wake("qwen-demo-0")
    pooled.wake("llama-demo-1")
    assert pool_pids(executor) == pids  # a wake only attached: no process started
    for report in executor.worker_report().values():
        assert dict(report.models) == held
    got = generate_all(pooled, ["qwen-demo-0", "llama-demo-1", "mistral-demo-0"])
    for model, tokens in got.items():
        assert tokens == want(demo_models, model), model


def test_a_killed_pooled_worker_recomputes_every_models_job(
    pooled: MuxEngine, demo_models: dict[str, Path]
) -> None:
    executor = pooled.executor
    assert isinstance(executor, MpsExecutor)
    unit = executor.groups[("llama-demo-0", Phase.DECODE)]
    assert isinstance(unit, PooledWorker)
    [victim] = [p.pid for p in unit.procs]
    models = ["llama-demo-0", "qwen-demo-1", "mistral-demo-1"]
    os.kill(victim, signal.SIGSTOP)  # so its first decode job is surely in flight when it dies
    try:
        pooled.start()
        pairs = [(m, p) for m in models for p in prompts_for(base_of(m))[:PER_MODEL]]
        rids = [(m, pooled.add_request(m, p, GREEDY)) for m, p in pairs]
        wait_until(lambda: unit.delivered, 60.0, "a decode job reached the pooled worker")
        assert unit.job is not None
        in_job = {s.request_id for s in unit.job.seqs}
        preempted = pooled.scheduler.num_preemptions
    finally:
        os.kill(victim, signal.SIGKILL)

    outs = streamed(pooled, [r for _, r in rids])
    got: dict[str, list[list[int]]] = {m: [] for m in models}
    for (m, _), out in zip(rids, outs, strict=True):
        assert out[-1].error is None
        got[m].append(tokens_of(out))
    for model in models:
        assert got[model] == want(demo_models, model), model
    assert in_job and pooled.scheduler.num_preemptions >= preempted + len(in_job)  # recomputed
    assert not Path(f"/proc/{victim}").exists()  # reaped, not left a zombie
    assert victim not in pool_pids(executor) and len(pool_pids(executor)) == 2
    wait_until(lambda: pooled.scheduler.jobs_in_flight == 0, 60.0, "idle")
    # the restarted worker holds every model again
    assert dict(executor.worker_report()[label(executor, Phase.DECODE)].models).keys() == set(
        pooled.models
    )
    pooled.check_integrity()
    assert pooled.scheduler.pool.num_free == pooled.scheduler.pool.num_blocks


def test_a_stopped_pooled_worker_is_found_by_the_watchdog_and_every_model_served(
    pooled: MuxEngine, demo_models: dict[str, Path]
) -> None:
    """SIGSTOP, not a kill: only the watchdog's stall check can find it. Its job is recomputed
    and the queued jobs of the other models go to the restarted process."""
    executor = pooled.executor
    assert isinstance(executor, MpsExecutor)
    unit = executor.groups[("qwen-demo-0", Phase.PREFILL)]
    [victim] = [p.pid for p in unit.procs]
    hangs, saved = executor.watch.hangs, executor.watch.deadline
    executor.watch.deadline = JobDeadline(60.0, 0.01, 3.0)  # 3 s without CPU time is a stall
    models = ["qwen-demo-0", "llama-demo-1", "mistral-demo-0"]
    os.kill(victim, signal.SIGSTOP)
    try:
        pooled.start()
        got = generate_all(pooled, models)
    finally:
        executor.watch.deadline = saved
        if Path(f"/proc/{victim}").exists():
            os.kill(victim, signal.SIGKILL)
    for model in models:
        assert got[model] == want(demo_models, model), model
    # the victim's; on a loaded host a starved worker could count too, and is recomputed alike
    assert executor.watch.hangs >= hangs + 1
    assert not Path(f"/proc/{victim}").exists() and len(pool_pids(executor)) == 2


def test_lazy_pooled_workers_start_at_the_first_job_and_stop_when_idle(
    demo_models: dict[str, Path],
) -> None:
    config = pooled_config(demo_models, worker_start="lazy", worker_idle_stop_s=1.0)
    with mps_engine_of(config) as (engine, executor):
        assert pool_pids(executor) == set()
        got = generate_all(engine, ["mistral-demo-1"])
        assert got["mistral-demo-1"] == want(demo_models, "mistral-demo-1")
        engine.start()
        wait_until(lambda: executor.idle_stops == 2, 60.0, "idle pooled workers stopped")
        assert pool_pids(executor) == set()
        units = {id(u): u for u in executor.groups.values()}.values()
        assert all(u.state is GroupState.STOPPED for u in units)


def test_a_bad_worker_pool_is_refused_naming_the_key(demo_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"engine\.worker_pool"):
        make_config(demo_models, executor="mps", worker_pool="pooled")


def test_a_per_model_wake_includes_its_workers_start(demo_models: dict[str, Path]) -> None:
    """Eager per-model workers: the wake returns with them ready (started inside the wake,
    not at the first job), new processes, and the first job after it gives HF's tokens."""
    with mps_engine_of(mps_config(demo_models, "llama-demo")) as (engine, executor):
        before = pool_pids(executor)
        engine.sleep("llama-demo", level=1)
        assert pool_pids(executor) == set()
        engine.wake("llama-demo")
        groups = [executor.groups[("llama-demo", phase)] for phase in Phase]
        assert [g.state for g in groups] == [GroupState.READY] * 2
        after = pool_pids(executor)
        assert len(after) == 2 and not after & before
        [out] = engine.generate([prompts_for("llama-demo")[0]], GREEDY, "llama-demo")
        assert out.token_ids == list(hf_greedy("llama-demo", demo_models["llama-demo"])[0])
    assert not [p for p in after if Path(f"/proc/{p}").exists()]


def test_a_per_model_wake_names_the_worker_that_could_not_start(
    demo_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The woken decode worker gets no WorkerInit: the wake names it in a warning, kills it
    (its process gone) and leaves the group for its first job to start again; the prefill
    group is ready; the model then serves HF's tokens."""
    from muxserve.executor import worker_unit
    from muxserve.executor.worker_group import WorkerGroup

    real, broken = worker_unit.send_init, []
    real_start, woken = WorkerGroup.start, {}

    def start(group: WorkerGroup) -> None:  # the woken groups' pids, by phase
        real_start(group)
        woken[group.phase] = [p.pid for p in group.procs]

    def break_decode(conn, init) -> None:  # the woken decode worker gets no WorkerInit
        if isinstance(init, WorkerInit) and init.phase is Phase.DECODE and not broken:
            broken.append(init.name)
            init = "not an init"
        real(conn, init)

    with mps_engine_of(mps_config(demo_models, "llama-demo")) as (engine, executor):
        engine.sleep("llama-demo", level=1)
        monkeypatch.setattr(worker_unit, "send_init", break_decode)
        monkeypatch.setattr(WorkerGroup, "start", start)
        with caplog.at_level("WARNING", logger="muxserve.executor.mps_roster"):
            engine.wake("llama-demo")
        monkeypatch.setattr(WorkerGroup, "start", real_start)
        assert broken == ["llama-demo"]
        [killed] = woken[Phase.DECODE]
        assert not Path(f"/proc/{killed}").exists()
        assert pool_pids(executor) == set(woken[Phase.PREFILL])
        assert [r.getMessage() for r in caplog.records if "while waking" in r.getMessage()] == [
            "llama-demo/decode: could not start: TypeError: expected WorkerInit, got str while "
            "waking; starting at its first job"
        ]
        groups = [executor.groups[("llama-demo", phase)] for phase in Phase]
        assert [g.state for g in groups] == [GroupState.READY, GroupState.STOPPED]
        assert executor.degraded() == {}
        [out] = engine.generate([prompts_for("llama-demo")[0]], GREEDY, "llama-demo")
        assert out.token_ids == list(hf_greedy("llama-demo", demo_models["llama-demo"])[0])
        after = pool_pids(executor)
        assert len(after) == 2
    assert not [p for p in after if Path(f"/proc/{p}").exists()]


def test_a_wake_that_raises_leaves_no_worker_behind(
    demo_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wake whose decode group cannot start (its `start` raises) kills the prefill group it
    had started, and raises; a wake during which the executor shuts down kills what it started
    instead of installing it. No process is left either time, and none is installed."""
    from muxserve.executor import mps_roster
    from muxserve.executor.worker_group import WorkerGroup

    real_start, real_wait = WorkerGroup.start, mps_roster.wait_ready
    started: list[int] = []

    def start_then_fail(group: WorkerGroup) -> None:
        if group.phase is Phase.DECODE:
            raise RuntimeError("cannot spawn")
        real_start(group)
        started.extend(p.pid for p in group.procs if p.pid is not None)

    def shut_down_meanwhile(units, timeout):  # type: ignore[no-untyped-def]
        failed = real_wait(units, timeout)
        started.extend(p.pid for u in units for p in u.procs if p.pid is not None)
        executor.shutdown()
        return failed

    with mps_engine_of(mps_config(demo_models, "llama-demo")) as (engine, executor):
        engine.sleep("llama-demo", level=1)
        monkeypatch.setattr(WorkerGroup, "start", start_then_fail)
        with pytest.raises(RuntimeError, match="cannot spawn"):
            engine.wake("llama-demo")
        assert len(started) == 1
        assert not [p for p in started if Path(f"/proc/{p}").exists()]
        assert executor.worker_pids() == {("llama-demo", p): [] for p in Phase}

        monkeypatch.setattr(WorkerGroup, "start", real_start)
        monkeypatch.setattr(mps_roster, "wait_ready", shut_down_meanwhile)
        started.clear()
        with pytest.raises(WorkerFailedError, match="llama-demo: the executor was shut down"):
            engine.wake("llama-demo")
        assert len(started) == 2
        assert not [p for p in started if Path(f"/proc/{p}").exists()]
        assert executor.worker_pids() == {("llama-demo", p): [] for p in Phase}
