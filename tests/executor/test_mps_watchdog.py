"""Issue 17's high item: a hung (SIGSTOPped) worker must not stop the other models.

An engine of its own (two models, default shares of 1.0): on a CPU the shares do not serialize
the models, so the other model's requests finish while the stopped one's job is still hung;
then, past its deadline, the watchdog kills the stopped group, restarts it and recomputes its
requests, which end with the same greedy text as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from muxserve.client.in_process import InProcessClient
from muxserve.engine import MuxEngine
from muxserve.executor.mps import MpsExecutor
from muxserve.executor.watchdog import JobDeadline
from muxserve.output_processor import RequestOutput
from muxserve.scheduler.job import Phase
from tests.helpers.engine import GREEDY, MAX_NEW, hf_greedy, prompts_for
from tests.helpers.mps import mps_config, mps_engine_of, streamed, tokens_of
from tests.helpers.wait import wait_until

LONG_DEADLINE_S = 600.0  # step 1: no watchdog may fire while qwen-demo is read


async def read(engine: MuxEngine, rid: str) -> tuple[list[RequestOutput], int]:
    """A request's outputs, and how many hung groups the executor had killed at its end."""
    outs = [o async for o in engine.stream(rid)]
    assert isinstance(engine.executor, MpsExecutor)
    return outs, engine.executor.watch.hangs


def test_a_stopped_worker_holds_back_only_its_model(demo_models: dict[str, Path]) -> None:
    two = ("llama-demo", "qwen-demo")
    config = mps_config(
        demo_models,
        *two,
        job_timeout_s=LONG_DEADLINE_S,
        job_timeout_per_token_s=0,
        job_stall_s=None,  # the deadline alone, here; the stall check has its own test
    )
    assert all(m.sm_share.decode == 1.0 for m in config.models)  # the defaults
    with mps_engine_of(config) as (engine, executor):
        group = executor.groups[("llama-demo", Phase.DECODE)]
        [victim] = [p.pid for p in group.procs]
        os.kill(victim, signal.SIGSTOP)  # its first decode job will never return
        engine.start()
        rids = {m: [engine.add_request(m, p, GREEDY) for p in prompts_for(m)[:3]] for m in two}

        # 1. qwen-demo is served while llama-demo's job hangs: nothing waits on the stuck job
        async def read_all(model: str) -> list[tuple[list[RequestOutput], int]]:
            return list(await asyncio.gather(*(read(engine, r) for r in rids[model])))

        qwen = asyncio.run(read_all("qwen-demo"))
        assert [hangs for _, hangs in qwen] == [0, 0, 0]
        assert group.job is not None and executor.watch.hangs == 0  # llama's job: still stuck

        # 2. the watchdog: past its deadline the stuck group is killed and restarted, and its
        # requests are recomputed (the deadline is shortened now, so step 1 never raced it,
        # and restored once it fired, so the recomputed jobs are not cut short)
        stuck_for = time.monotonic() - group.sent_at  # seconds: as long as qwen took
        assert group.job is not None
        stuck = len(group.job.seqs)  # 1 to 3: the prefills may have come in several jobs
        # past for the stuck job only
        executor.watch.deadline = JobDeadline(stuck_for / 2, 0.0, None)
        executor.wake()
        seen_degraded: list[dict[str, object]] = []

        def watch() -> None:  # /health while the stopped group restarts
            client = InProcessClient(engine, manage=False)
            wait_until(lambda: executor.watch.hangs == 1, 60.0, "hung group killed")
            # the recomputes run freely
            executor.watch.deadline = JobDeadline(LONG_DEADLINE_S, 0.0, None)
            wait_until(lambda: "llama-demo" in engine.degraded(), 10.0, "llama-demo degraded")
            seen_degraded.append(client.health().to_json())

        async def llama_and_watch() -> list[tuple[list[RequestOutput], int]]:
            watcher = asyncio.create_task(asyncio.to_thread(watch))
            got = await read_all("llama-demo")
            await watcher
            return got

        llama = asyncio.run(llama_and_watch())
        assert [hangs for _, hangs in llama] == [1, 1, 1]  # recomputed, then done
        for m, got in (("qwen-demo", qwen), ("llama-demo", llama)):
            want = [list(t) for t in hf_greedy(m, demo_models[m])[:3]]
            for (outs, _), tokens in zip(got, want, strict=True):
                assert tokens_of(outs) == tokens
                reason = "length" if len(tokens) == MAX_NEW else "stop"  # EOS before the limit
                assert (outs[-1].finish_reason, outs[-1].error) == (reason, None)
        (health,) = seen_degraded
        assert health["status"] == "degraded"
        local = health["meshes"]["local"]  # type: ignore[index]
        assert "no result after" in local["degraded_models"]["llama-demo"]  # type: ignore[index]
        assert group.procs[0].pid != victim
        assert not Path(f"/proc/{victim}").exists()  # killed and reaped
        wait_until(lambda: not engine.degraded(), 60.0, "llama-demo serving again")
        assert engine.scheduler.num_preemptions == stuck  # the hung job's requests, recomputed
        wait_until(lambda: engine.scheduler.jobs_in_flight == 0, 60.0, "idle")
        engine.check_integrity()
        assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_a_restart_that_never_gets_ready_is_killed_and_started_again(
    demo_models: dict[str, Path], monkeypatch
) -> None:
    from muxserve.executor import worker_unit

    with mps_engine_of(mps_config(demo_models, "llama-demo")) as (engine, executor):
        executor.watch.start_timeout = 1.0  # for the hung restart (the first start is over)
        group = executor.groups[("llama-demo", Phase.DECODE)]
        [first] = [p.pid for p in group.procs]
        real, dropped = worker_unit.send_init, []

        def drop_first(conn, init) -> None:  # the restarted worker waits for its init forever
            if not dropped:
                dropped.append(init.name)
                return
            executor.watch.start_timeout = 600.0  # the next start may take its time on a busy host
            real(conn, init)

        monkeypatch.setattr(worker_unit, "send_init", drop_first)
        os.kill(first, signal.SIGKILL)  # found while the prefill job runs; its restart hangs
        engine.start()
        prompt = prompts_for("llama-demo")[0]
        rid = engine.add_request("llama-demo", prompt, GREEDY)
        [outs] = streamed(engine, [rid])
        want = list(hf_greedy("llama-demo", demo_models["llama-demo"])[0])
        assert tokens_of(outs) == want
        assert outs[-1].error is None
        assert dropped == ["llama-demo"] and executor.watch.hangs == 1  # the hung start, killed
        assert group.failed_starts == 0  # the second start got ready
        assert first not in [p.pid for p in group.procs]
        wait_until(lambda: engine.scheduler.jobs_in_flight == 0, 60.0, "idle")
        assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_a_stopped_worker_is_found_by_its_stall_long_before_its_deadline(
    demo_models: dict[str, Path], caplog
) -> None:
    config = mps_config(demo_models, "llama-demo", job_timeout_s=LONG_DEADLINE_S, job_stall_s=1.0)
    with mps_engine_of(config) as (engine, executor):
        group = executor.groups[("llama-demo", Phase.DECODE)]
        [victim] = [p.pid for p in group.procs]
        os.kill(victim, signal.SIGSTOP)  # its first decode job makes no progress
        engine.start()
        rid = engine.add_request("llama-demo", prompts_for("llama-demo")[0], GREEDY)
        with caplog.at_level("ERROR", logger="muxserve.executor.mps"):
            [outs] = streamed(engine, [rid])
        want = list(hf_greedy("llama-demo", demo_models["llama-demo"])[0])
        assert tokens_of(outs) == want and outs[-1].error is None
        assert executor.watch.hangs == 1
        [line] = [r.getMessage() for r in caplog.records if "killed" in r.getMessage()]
        assert line.startswith("llama-demo/decode: no progress for ")
        assert "(stopped or stuck;" in line and "its job is recomputed" in line
        assert not Path(f"/proc/{victim}").exists()
