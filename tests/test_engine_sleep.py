"""Sleep and wake per model on the inline executor (CPU): weights back bit for bit, no KV while
asleep, a request wakes its model without holding the others back, residency under a budget."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from muxserve.client.protocol import ModelState
from muxserve.config import MuxConfig, parse_config
from muxserve.engine import MuxEngine
from muxserve.errors import (
    InsufficientMemoryError,
    ModelBusyError,
    ModelDoesNotFitError,
    UnknownModelError,
)
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Phase
from muxserve.scheduler.scheduler import ModelStats
from tests.helpers.wait import wait_until

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3, 99, 42], list(range(20, 60))]
DEADLINE_S = 60.0  # any wait in these tests, at most


def config(
    demo_models: dict[str, Path],
    asleep: tuple[str, ...] = (),
    residency: dict[str, object] | None = None,
) -> MuxConfig:
    return parse_config(
        {
            "models": [
                {"name": n, "path": str(p), "initial_state": "asleep" if n in asleep else "awake"}
                for n, p in demo_models.items()
            ],
            "engine": {
                "kv_pool_bytes": 4 << 20,
                "block_bytes": 4096,
                "residency": residency or {},
            },
        }
    )


def outputs(engine: MuxEngine, model: str) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(PROMPTS, GREEDY, model)]


def weights(engine: MuxEngine, model: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.executor.runners[model].model.state_dict().items()}


@pytest.fixture(scope="module")
def engine(demo_models):
    eng = MuxEngine(config(demo_models))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(engine) -> dict[str, list[list[int]]]:
    return {m: outputs(engine, m) for m in engine.models}


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_give_the_same_greedy_output(engine, reference, level):
    model = "qwen-demo"
    before = weights(engine, model)
    engine.sleep(model, level)
    assert engine.model_states()[model] is ModelState.ASLEEP
    st = engine.stats()[model]
    assert (st.blocks_used, st.blocks_quota, st.running, st.waiting) == (0, 0, 0, 0)
    assert engine.executor.runners[model].weights.on_device is False
    assert engine.executor.runners[model].weights.in_host is (level == 1)  # 2: dropped
    took = engine.wake(model)
    assert took > 0.0
    assert engine.model_states()[model] is ModelState.AWAKE
    after = weights(engine, model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert outputs(engine, model) == reference[model]
    engine.check_integrity()


def test_a_sleeping_models_quota_goes_to_the_others(engine):
    engine.sleep("llama-demo", 1)
    try:
        quotas = {m: s.blocks_quota for m, s in engine.stats().items()}
        assert quotas["llama-demo"] == 0
        engine.generate(PROMPTS[:1], GREEDY, "mistral-demo")  # steps rebalance the pool
        quotas = {m: s.blocks_quota for m, s in engine.stats().items()}
        assert quotas["llama-demo"] == 0
        assert quotas["qwen-demo"] + quotas["mistral-demo"] == engine.pool.num_blocks
    finally:
        engine.wake("llama-demo")
    engine.check_integrity()


def test_waking_an_awake_model_takes_no_time_and_sleep_twice_is_a_no_op(engine):
    assert engine.wake("llama-demo") == 0.0
    sleeps = engine.wake_stats()["llama-demo"].sleeps
    engine.sleep("llama-demo", 1)
    engine.sleep("llama-demo", 1)
    engine.sleep("llama-demo", 2)  # deeper: the host copy is dropped
    assert engine.executor.runners["llama-demo"].weights.in_host is False
    assert engine.wake_stats()["llama-demo"].sleeps == sleeps + 1
    engine.wake("llama-demo")
    assert engine.model_states()["llama-demo"] is ModelState.AWAKE


def run_until_done(engine: MuxEngine, rid: str) -> list[RequestOutput]:
    """Step the engine (no loop thread) until nothing is left, then read `rid`'s outputs."""
    for _ in range(10_000):  # bounded: each step finishes jobs or waits for the wake
        if not engine.has_work():
            break
        engine.step()
    assert not engine.has_work()

    async def read() -> list[RequestOutput]:
        return [o async for o in engine.stream(rid)]

    return asyncio.run(asyncio.wait_for(read(), DEADLINE_S))


def test_a_request_wakes_its_model_and_counts_the_wake(engine, reference):
    engine.sleep("mistral-demo", 2)
    wakes = engine.wake_stats()["mistral-demo"].wakes
    rid = engine.add_request("mistral-demo", PROMPTS[0], GREEDY)
    got = run_until_done(engine, rid)
    assert got[-1].finished and got[-1].error is None
    assert [t for o in got for t in o.token_ids] == reference["mistral-demo"][0]
    timings = got[-1].timings
    assert timings is not None and 0 < timings.wake <= timings.queue
    assert engine.wake_stats()["mistral-demo"].wakes == wakes + 1
    assert engine.model_states()["mistral-demo"] is ModelState.AWAKE


def test_sleep_with_requests_in_flight_is_refused(engine):
    rid = engine.add_request("qwen-demo", PROMPTS[0], GREEDY)  # no loop: it waits
    with pytest.raises(ModelBusyError, match="'qwen-demo' has 1 request"):
        engine.sleep("qwen-demo")
    assert engine.model_states()["qwen-demo"] is ModelState.AWAKE
    engine.abort(rid)
    engine.sleep("qwen-demo")  # drained: now it may
    engine.wake("qwen-demo")
    engine.check_integrity()


def test_bad_input(engine):
    with pytest.raises(UnknownModelError):
        engine.sleep("nope")
    with pytest.raises(UnknownModelError):
        engine.wake("nope")
    with pytest.raises(ValueError, match="level must be 1"):
        engine.sleep("qwen-demo", 3)
    assert engine.model_states()["qwen-demo"] is ModelState.AWAKE


def test_other_models_are_served_while_one_wakes(demo_models):
    """The wake is held open (an event, not a sleep) while another model's request completes."""
    eng = MuxEngine(config(demo_models, asleep=("llama-demo",)))
    release, entered = threading.Event(), threading.Event()
    real_wake = eng.executor.wake_model

    def held_wake(model: str) -> None:
        entered.set()
        assert release.wait(DEADLINE_S), "the test never released the wake"
        real_wake(model)

    eng.executor.wake_model = held_wake  # type: ignore[method-assign]
    eng.start()

    async def run() -> None:
        sleeping = eng.add_request("llama-demo", PROMPTS[0], GREEDY)
        assert await asyncio.to_thread(entered.wait, DEADLINE_S)
        assert eng.model_states()["llama-demo"] is ModelState.WAKING
        awake = eng.add_request("qwen-demo", PROMPTS[1], GREEDY)

        async def last(rid: str) -> RequestOutput:
            outs = [o async for o in eng.stream(rid)]
            return outs[-1]

        done = await asyncio.wait_for(last(awake), DEADLINE_S)
        assert done.finished and done.error is None
        assert eng.model_states()["llama-demo"] is ModelState.WAKING  # still held
        release.set()
        woke = await asyncio.wait_for(last(sleeping), DEADLINE_S)
        assert woke.finished and woke.error is None and woke.timings.wake > 0

    try:
        asyncio.run(run())
    finally:
        release.set()
        eng.shutdown()
    eng.check_integrity()


# ---- more models than memory --------------------------------------------------------------
def budget_for(demo_models, n: int) -> tuple[int, dict[str, int]]:
    """A weights budget that holds the `n` largest demo models exactly, and each one's bytes."""
    eng = MuxEngine(config(demo_models, asleep=tuple(demo_models)))
    sizes = {m: eng.executor.weight_bytes(m) for m in eng.models}
    eng.shutdown()
    return sum(sorted(sizes.values())[len(sizes) - n :]), sizes


def test_a_model_that_starts_asleep_is_not_loaded_and_wakes_on_demand(demo_models, reference):
    eng = MuxEngine(config(demo_models, asleep=("qwen-demo",)))
    assert eng.model_states()["qwen-demo"] is ModelState.ASLEEP
    weights = eng.executor.runners["qwen-demo"].weights
    assert (weights.on_device, weights.in_host) == (False, False)  # never loaded
    assert eng.stats()["qwen-demo"].blocks_quota == 0
    assert outputs(eng, "qwen-demo") == reference["qwen-demo"]
    assert eng.model_states()["qwen-demo"] is ModelState.AWAKE
    eng.shutdown()


def test_a_wake_that_does_not_fit_names_the_model_and_what_holds_memory(demo_models):
    budget, sizes = budget_for(demo_models, 2)
    eng = MuxEngine(
        config(
            demo_models,
            asleep=("llama-demo",),
            residency={"weights_budget_bytes": budget, "min_residency_s": 3600},
        )
    )
    try:
        with pytest.raises(ModelDoesNotFitError) as e:
            eng.wake("llama-demo")
        assert e.value.model == "llama-demo"
        assert e.value.needed_bytes == sizes["llama-demo"]
        assert e.value.held_by == {
            "qwen-demo": sizes["qwen-demo"],
            "mistral-demo": sizes["mistral-demo"],
        }
        assert "'llama-demo' does not fit" in str(e.value) and "qwen-demo" in str(e.value)
        assert eng.model_states()["llama-demo"] is ModelState.ASLEEP
    finally:
        eng.shutdown()


def test_under_pressure_the_least_valuable_idle_model_sleeps(demo_models):
    budget, _ = budget_for(demo_models, 2)
    eng = MuxEngine(
        config(
            demo_models,
            asleep=("llama-demo",),
            residency={"weights_budget_bytes": budget, "min_residency_s": 0},
        )
    )
    try:
        for _ in range(3):  # mistral is in demand; qwen is not
            eng.generate(PROMPTS[:1], GREEDY, "mistral-demo")
        out = eng.generate(PROMPTS[:1], GREEDY, "llama-demo")  # wakes llama: qwen makes room
        assert out[0].error is None
        states = eng.model_states()
        assert states == {
            "llama-demo": ModelState.AWAKE,
            "qwen-demo": ModelState.ASLEEP,
            "mistral-demo": ModelState.AWAKE,
        }
        assert eng.stats()["qwen-demo"].blocks_quota == 0
        eng.check_integrity()
    finally:
        eng.shutdown()


def test_awake_models_over_the_budget_fail_at_start(demo_models):
    budget, _ = budget_for(demo_models, 2)
    with pytest.raises(InsufficientMemoryError, match="initial_state: asleep"):
        MuxEngine(config(demo_models, residency={"weights_budget_bytes": budget}))


def test_a_request_for_a_model_over_the_whole_budget_is_refused_at_once(demo_models):
    _, sizes = budget_for(demo_models, 1)
    small = min(sizes, key=sizes.__getitem__)
    big = max(sizes, key=sizes.__getitem__)
    assert sizes[big] > sizes[small]
    asleep = tuple(m for m in demo_models if m != small)
    eng = MuxEngine(
        config(demo_models, asleep=asleep, residency={"weights_budget_bytes": sizes[small]})
    )
    try:
        with pytest.raises(ModelDoesNotFitError, match=big):
            eng.add_request(big, PROMPTS[0], GREEDY)
        assert eng.stats()[big].waiting == 0
    finally:
        eng.shutdown()


def test_idle_models_are_put_to_sleep_after_idle_sleep_s(demo_models):
    eng = MuxEngine(config(demo_models, residency={"idle_sleep_s": 0.2, "min_residency_s": 0}))
    eng.start()
    try:
        wait_until(
            lambda: set(eng.model_states().values()) == {ModelState.ASLEEP},
            DEADLINE_S,
            "every idle model asleep",
        )
        assert all(s.blocks_quota == 0 for s in eng.stats().values())
        out = eng.generate(PROMPTS[:1], GREEDY, "qwen-demo")  # wakes it again
        assert out[0].error is None and out[0].token_ids
    finally:
        eng.shutdown()


def two_copies(demo_models, budget: int, **residency: object) -> MuxEngine:
    """Two copies of llama-demo, "a" awake and "b" asleep, with a budget for one of them."""
    path = str(demo_models["llama-demo"])
    return MuxEngine(
        parse_config(
            {
                "models": [
                    {"name": "a", "path": path},
                    {"name": "b", "path": path, "initial_state": "asleep"},
                ],
                "engine": {
                    "kv_pool_bytes": 4 << 20,
                    "block_bytes": 4096,
                    "residency": {"weights_budget_bytes": budget, **residency},
                },
            }
        )
    )


def step_until_idle(engine: MuxEngine) -> None:
    """Step (no loop thread) until no request is left; bounded by `DEADLINE_S`."""
    import time

    deadline = time.monotonic() + DEADLINE_S
    while engine.has_work():
        assert time.monotonic() < deadline, f"still busy: {engine.stats()}"
        engine.step()


def read(engine: MuxEngine, rid: str) -> list[RequestOutput]:
    async def go() -> list[RequestOutput]:
        return [o async for o in engine.stream(rid)]

    return asyncio.run(asyncio.wait_for(go(), DEADLINE_S))


def test_a_request_waits_for_a_busy_model_to_go_idle_then_takes_its_place(demo_models):
    size = budget_for(demo_models, 0)[1]["llama-demo"]
    eng = two_copies(demo_models, size, min_residency_s=0)
    try:
        busy = eng.add_request("a", PROMPTS[0], GREEDY)  # "a" is in flight: not evictable
        waits = eng.add_request("b", PROMPTS[1], GREEDY)  # its waker finds no room yet
        assert eng.model_states()["b"] is ModelState.ASLEEP
        step_until_idle(eng)  # "a" finishes; the waker puts it to sleep and wakes "b"
        assert read(eng, busy)[-1].error is None
        out = read(eng, waits)
        assert out[-1].finished and out[-1].error is None and out[-1].timings.wake > 0
        assert eng.model_states() == {"a": ModelState.ASLEEP, "b": ModelState.AWAKE}
        eng.check_integrity()
    finally:
        eng.shutdown()


def test_a_request_that_never_finds_room_ends_with_the_reason(demo_models):
    size = budget_for(demo_models, 0)[1]["llama-demo"]
    eng = two_copies(demo_models, size, min_residency_s=3600, wake_timeout_s=0.3)
    try:
        rid = eng.add_request("b", PROMPTS[0], GREEDY)
        step_until_idle(eng)  # the waker gives up after wake_timeout_s and fails the request
        out = read(eng, rid)
        assert out[-1].finished and out[-1].finish_reason == "error"
        assert "'b' does not fit" in out[-1].error and "held by a" in out[-1].error
        assert eng.model_states() == {"a": ModelState.AWAKE, "b": ModelState.ASLEEP}
        assert eng.stats()["b"] == ModelStats(0, 0, 0, 0)
        eng.check_integrity()
    finally:
        eng.shutdown()


def test_running_out_of_memory_while_waking_is_a_does_not_fit_error(demo_models):
    eng = MuxEngine(config(demo_models, asleep=("qwen-demo",)))

    def oom(model: str) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    eng.executor.wake_model = oom  # type: ignore[method-assign]
    try:
        with pytest.raises(ModelDoesNotFitError, match="'qwen-demo' does not fit") as e:
            eng.wake("qwen-demo")
        assert set(e.value.held_by) == {"llama-demo", "mistral-demo"}
        assert eng.model_states()["qwen-demo"] is ModelState.ASLEEP
    finally:
        eng.shutdown()


def test_a_level_1_sleep_that_cannot_keep_the_weights_drops_them(demo_models, reference):
    eng = MuxEngine(config(demo_models))
    runner = eng.executor.runners["qwen-demo"]

    def no_host_memory(*args: object) -> None:
        raise RuntimeError("no pinned memory")

    runner.weights.to_host = no_host_memory  # type: ignore[method-assign]
    try:
        eng.sleep("qwen-demo", 1)
        assert eng.model_states()["qwen-demo"] is ModelState.ASLEEP
        assert (runner.weights.on_device, runner.weights.in_host) == (False, False)  # dropped
        assert outputs(eng, "qwen-demo") == reference["qwen-demo"]  # reloaded
    finally:
        eng.shutdown()


def test_more_models_than_memory_all_served(demo_models, reference):
    """Six models (two copies of each demo model) with room for the two largest demo models'
    weights: every request of every model is served, with the same greedy text, by sleeping
    and waking them."""
    budget, _ = budget_for(demo_models, 2)
    names = {f"{m}-{i}": m for i in range(2) for m in demo_models}
    eng = MuxEngine(
        parse_config(
            {
                "models": [
                    {
                        "name": n,
                        "path": str(demo_models[m]),
                        "initial_state": "asleep" if n not in ("mistral-demo-0",) else "awake",
                    }
                    for n, m in names.items()
                ],
                "engine": {
                    "kv_pool_bytes": 4 << 20,
                    "block_bytes": 4096,
                    "residency": {"weights_budget_bytes": budget, "min_residency_s": 0},
                },
            }
        )
    )
    eng.start()

    async def run() -> dict[str, list[int]]:
        rids = {n: eng.add_request(n, PROMPTS[0], GREEDY) for n in names}

        async def tokens(rid: str) -> list[int]:
            outs = [o async for o in eng.stream(rid)]
            assert outs[-1].finished and outs[-1].error is None, outs[-1].error
            return [t for o in outs for t in o.token_ids]

        got = await asyncio.wait_for(
            asyncio.gather(*(tokens(r) for r in rids.values())), DEADLINE_S
        )
        return dict(zip(rids, got, strict=True))

    try:
        got = asyncio.run(run())
        assert got == {n: reference[m][0] for n, m in names.items()}
        awake = [n for n, s in eng.model_states().items() if s is ModelState.AWAKE]
        assert sum(eng.executor.weight_bytes(n) for n in awake) <= budget
        assert sum(w.wakes for w in eng.wake_stats().values()) >= len(names) - 1
        eng.check_integrity()
    finally:
        eng.shutdown()


# ---- the mps executor: a sleeping model has no worker processes -------------------------------
def mps_engine(demo_models, asleep: tuple[str, ...] = (), pool: str = "per_model") -> MuxEngine:
    return MuxEngine(
        parse_config(
            {
                "models": [
                    {
                        "name": n,
                        "path": str(demo_models[n]),
                        "initial_state": "asleep" if n in asleep else "awake",
                    }
                    for n in ("llama-demo", "qwen-demo")
                ],
                "engine": {
                    "kv_pool_bytes": 4 << 20,
                    "block_bytes": 4096,
                    "executor": "mps",
                    "worker_pool": pool,
                },
            }
        )
    )


def workers(engine: MuxEngine, model: str) -> list[int]:
    pids = engine.executor.worker_pids()  # type: ignore[attr-defined]
    return [p for (m, _), ps in pids.items() if m == model for p in ps]


def test_mps_sleep_stops_the_workers_and_wake_gives_the_same_output(demo_models, reference):
    eng = mps_engine(demo_models, asleep=("qwen-demo",))
    try:
        assert workers(eng, "qwen-demo") == [] and len(workers(eng, "llama-demo")) == 2
        assert outputs(eng, "qwen-demo") == reference["qwen-demo"]  # woken, loaded, workers
        assert len(workers(eng, "qwen-demo")) == 2
        for level in (1, 2):
            eng.sleep("llama-demo", level)
            assert workers(eng, "llama-demo") == []
            assert eng.stats()["llama-demo"].blocks_quota == 0
            assert outputs(eng, "llama-demo") == reference["llama-demo"]  # wakes it
            assert eng.model_states()["llama-demo"] is ModelState.AWAKE
        eng.check_integrity()
    finally:
        eng.shutdown()


def attached(engine: MuxEngine, model: str) -> bool:
    """Whether `model` is attached to its pooled workers (worker_pool: shared)."""
    units = [engine.executor.groups[(model, ph)] for ph in Phase]  # type: ignore[attr-defined]
    return all(model in u.members for u in units)


@pytest.mark.parametrize("pool", ["per_model", "shared"])
def test_mps_sleep_and_wake_while_the_loop_serves_another_model(demo_models, reference, pool):
    """Shared: the sleep detaches llama from the workers running qwen's jobs, and the wake
    attaches it again while they run."""
    eng = mps_engine(demo_models, pool=pool)
    pids = set(workers(eng, "qwen-demo"))
    eng.start()

    async def last(rid: str) -> list[int]:
        outs = [o async for o in eng.stream(rid)]
        assert outs[-1].finished and outs[-1].error is None, outs[-1].error
        return [t for o in outs for t in o.token_ids]

    async def run() -> None:
        other = eng.add_request("qwen-demo", PROMPTS[2], GREEDY)
        await asyncio.to_thread(eng.sleep, "llama-demo", 2)  # while qwen's jobs run
        if pool == "shared":
            assert not attached(eng, "llama-demo")
            assert set(workers(eng, "llama-demo")) == pids  # the pooled workers run on
        else:
            assert workers(eng, "llama-demo") == []
        woke = eng.add_request("llama-demo", PROMPTS[0], GREEDY)
        got = await asyncio.wait_for(asyncio.gather(last(other), last(woke)), DEADLINE_S)
        assert got == [reference["qwen-demo"][2], reference["llama-demo"][0]]

    try:
        asyncio.run(run())
        assert len(workers(eng, "llama-demo")) == 2
        if pool == "shared":
            assert attached(eng, "llama-demo") and set(workers(eng, "llama-demo")) == pids
    finally:
        eng.shutdown()
    eng.check_integrity()
