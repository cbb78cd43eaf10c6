"""Faults and shutdown with the mps executor: a killed worker's job is recomputed on the
restarted worker (no request is lost) and the other models are untouched; shutdown leaves no
process and no shared memory behind.

The fault test shares test_mps_engine.py's session engine; the shutdown test builds its own.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from muxserve.config import parse_config
from muxserve.engine import MuxEngine
from muxserve.errors import WorkerFailedError
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase
from tests.executor.conftest import SHM, mps_config
from tests.helpers.engine import MAX_NEW, hf_greedy, prompts_for

MODELS = ["llama-demo", "qwen-demo", "mistral-demo"]
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
PER_MODEL = 4  # requests per model in flight when the worker dies


def collect(engine: MuxEngine, rids: list[str]) -> list[list[RequestOutput]]:
    async def run() -> list[list[RequestOutput]]:
        return list(await asyncio.gather(*(_read(engine, r) for r in rids)))

    return asyncio.run(run())


async def _read(engine: MuxEngine, rid: str) -> list[RequestOutput]:
    return [o async for o in engine.stream(rid)]


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_killed_worker_restarts_and_its_job_is_recomputed(mps_engine, demo_models):
    engine = mps_engine
    group = engine.executor.groups[("llama-demo", Phase.DECODE)]
    [victim] = [p.pid for p in group.procs]
    # stopped first, so that its first decode job is surely in flight when it dies
    os.kill(victim, signal.SIGSTOP)
    try:
        engine.start()
        rids = {
            m: [engine.add_request(m, p, GREEDY) for p in prompts_for(m)[:PER_MODEL]]
            for m in MODELS
        }
        wait_for(lambda: group.job is not None)
        in_job = {s.request_id for s in group.job.seqs}
    finally:
        os.kill(victim, signal.SIGKILL)
    outs = {m: collect(engine, r) for m, r in rids.items()}

    for m in MODELS:
        want = [list(t) for t in hf_greedy(m, demo_models[m])[:PER_MODEL]]
        for out, tokens in zip(outs[m], want, strict=True):
            # the killed job's requests were recomputed on the restarted worker: no request
            # is lost, and each gives the same text as one that never met a fault
            got = [t for o in out for t in o.token_ids]
            assert (got, out[-1].error) == (tokens, None)
            assert out[-1].finish_reason in ("length", "stop")  # stop: an EOS at the limit
    assert in_job
    assert engine.scheduler.num_preemptions >= len(in_job)

    # restarted: the model serves again, within seconds
    start = time.monotonic()
    [again] = engine.generate([prompts_for("llama-demo")[0]], GREEDY, "llama-demo")
    assert again.token_ids == list(hf_greedy("llama-demo", demo_models["llama-demo"])[0])
    assert time.monotonic() - start < 60
    assert group.procs[0].pid != victim
    wait_for(lambda: engine.scheduler.jobs_in_flight == 0)
    engine.check_integrity()
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_shutdown_leaves_no_process_or_shared_memory(demo_models, shm_before):
    """An engine of its own (one model, two workers), so no other test depends on the order."""
    raw = mps_config(demo_models).model_dump()
    raw["models"] = [m for m in raw["models"] if m["name"] == "llama-demo"]
    mps_engine = MuxEngine(parse_config(raw))
    [done] = mps_engine.generate(["bye"], SamplingParams(max_tokens=3), "llama-demo")
    assert len(done.token_ids) == 3
    pids = [pid for group in mps_engine.executor.worker_pids().values() for pid in group]
    assert len(pids) == 2
    mps_engine.shutdown()
    # the session engine's workers may still run: only this engine's must be gone
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    ours = {str(os.getpid()), *map(str, pids)}
    new = {p.name for p in SHM.iterdir()} - shm_before
    assert not [n for n in new if any(pid in n.split("_") for pid in ours)]
    with pytest.raises(WorkerFailedError, match="shut down"):
        mps_engine.executor.submit([Job(10**6, "llama-demo", Phase.DECODE, (), 0.3)])


def _children(pid: int) -> list[str]:
    """Command lines of the live child processes of `pid`."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append((status.parent / "cmdline").read_text().replace("\0", " "))
    return found
