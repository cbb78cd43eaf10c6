"""Faults and shutdown with the mps executor: a killed worker's job is recomputed on the
restarted worker (no request is lost) and the other models are untouched; shutdown leaves no
process and no shared memory behind.

The fault test shares test_mps_engine.py's session engine; the shutdown test builds its own.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from muxserve.errors import WorkerFailedError
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase
from tests.helpers.engine import GREEDY, hf_greedy, prompts_for
from tests.helpers.mps import SHARES, SHM, mps_config, mps_engine_of, streamed, tokens_of
from tests.helpers.wait import wait_until

MODELS = ["llama-demo", "qwen-demo", "mistral-demo"]
PER_MODEL = 4  # requests per model in flight when the worker dies


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
        wait_until(lambda: group.job is not None, 60.0, "a llama decode job")
        in_job = {s.request_id for s in group.job.seqs}
    finally:
        os.kill(victim, signal.SIGKILL)
    outs = {m: streamed(engine, r) for m, r in rids.items()}

    for m in MODELS:
        want = [list(t) for t in hf_greedy(m, demo_models[m])[:PER_MODEL]]
        for out, want_tokens in zip(outs[m], want, strict=True):
            # the killed job's requests were recomputed on the restarted worker: no request
            # is lost, and each gives the same text as one that never met a fault
            assert (tokens_of(out), out[-1].error) == (want_tokens, None)
            assert out[-1].finish_reason in ("length", "stop")  # stop: an EOS at the limit
    assert in_job
    assert engine.scheduler.num_preemptions >= len(in_job)

    # restarted: the model serves again, within seconds
    start = time.monotonic()
    [again] = engine.generate([prompts_for("llama-demo")[0]], GREEDY, "llama-demo")
    assert again.token_ids == list(hf_greedy("llama-demo", demo_models["llama-demo"])[0])
    assert time.monotonic() - start < 60
    assert group.procs[0].pid != victim
    wait_until(lambda: engine.scheduler.jobs_in_flight == 0, 60.0, "idle")
    engine.check_integrity()
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_shutdown_leaves_no_process_or_shared_memory(demo_models, shm_before):
    """An engine of its own (one model, two workers), so no other test depends on the order."""
    with mps_engine_of(mps_config(demo_models, "llama-demo", sm_share=SHARES)) as (engine, ex):
        [done] = engine.generate(["bye"], SamplingParams(max_tokens=3), "llama-demo")
        assert len(done.token_ids) == 3
        pids = [pid for group in ex.worker_pids().values() for pid in group]
        assert len(pids) == 2
    # the session engine's workers may still run: only this engine's must be gone
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    ours = {str(os.getpid()), *map(str, pids)}
    new = {p.name for p in SHM.iterdir()} - shm_before
    assert not [n for n in new if any(pid in n.split("_") for pid in ours)]
    with pytest.raises(WorkerFailedError, match="shut down"):
        ex.submit([Job(10**6, "llama-demo", Phase.DECODE, (), 0.3)])
