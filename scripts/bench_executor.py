"""Executor benchmark: per-job dispatch overhead of the mps executor (worker processes) vs inline.

    python scripts/bench_executor.py [--jobs 400] [--repeats 5] [--batch 1]
                                     [--out benchmarks/results/executor]

Both executors run the same 1-token decode jobs of llama-demo (the tiny demo model) back to
back, one job in flight at a time, each with one intra-op thread, in this one process: the
inline executor computes in this process, the mps executor sends each job to a worker process
and waits for its result. The difference of the per-job times is what a job pays for going to a
worker: encoding the delta message, two pipe crossings, decoding, the mirror, the result. The
two are measured in alternating repeats and the medians taken, since timings drift on a busy
machine. Also reported: the bytes a decode job of 64 sequences costs on the wire, as a delta
message vs the whole `Job` pickled.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from muxserve.config import SMShare
from muxserve.executor.base import Executor, ModelSpec, create_executor
from muxserve.executor.mirror import WorkerMirror
from muxserve.model_descriptor import describe_model
from muxserve.models.loader import validate_checkpoint
from muxserve.runner.kv_pool import PoolSizing
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork

BLOCK_BYTES = 4096
NUM_BLOCKS = 512
GREEDY = SamplingParams(temperature=0.0)
ONE_THREAD = 0.01  # an SM share that becomes one intra-op thread on any CPU


def make_spec(path: Path) -> ModelSpec:
    config = validate_checkpoint(path)
    share = SMShare(prefill=ONE_THREAD, decode=ONE_THREAD)
    model = describe_model("llama-demo", config, "float32", block_bytes=BLOCK_BYTES, sm_share=share)
    return ModelSpec.of(model, path)


def decode_jobs(spec: ModelSpec, batch: int, count: int, first_id: int) -> list[Job]:
    """`count` decode jobs of `batch` sequences at position 16, over disjoint block tables."""
    layout = spec.layout
    rows = layout.logical_blocks_for(32)
    seqs = []
    for i in range(batch):
        first = i * rows * layout.blocks_per_logical
        ids = np.arange(first, first + rows * layout.blocks_per_logical, dtype=np.int32)
        table = ids.reshape(rows, layout.num_layers, layout.num_kv_heads)
        seqs.append(SeqWork(f"r{i}", (5,), 16, table, True, GREEDY, seed=i, step=1))
    return [
        Job(first_id + n, spec.name, Phase.DECODE, tuple(seqs), ONE_THREAD) for n in range(count)
    ]


def time_jobs(executor: Executor, jobs: list[Job]) -> float:
    """Seconds per job, one job in flight at a time."""
    start = time.perf_counter()
    for job in jobs:
        executor.submit([job])
        done = executor.poll(60.0)
        assert len(done) == 1 and done[0][1].error is None, done
    return (time.perf_counter() - start) / len(jobs)


def wire_bytes(spec: ModelSpec, batch: int) -> dict[str, int]:
    """Pickled bytes of a steady-state decode job: the delta message vs the whole Job."""
    first, second = decode_jobs(spec, batch, 2, 0)
    mirror = WorkerMirror()
    mirror.encode(first)  # the worker has seen these requests once
    return {
        "sequences": batch,
        "delta_message_bytes": len(pickle.dumps(mirror.encode(second))),
        "whole_job_bytes": len(pickle.dumps(second)),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=400, help="jobs per timed run")
    p.add_argument("--repeats", type=int, default=5, help="alternating runs per executor")
    p.add_argument("--batch", type=int, default=1, help="sequences per decode job")
    p.add_argument("--out", default="benchmarks/results/executor")
    args = p.parse_args()

    from muxserve.demo import ensure_demo_models

    spec = make_spec(ensure_demo_models()["llama-demo"])
    torch.set_num_threads(1)  # the inline executor computes here: the same one thread
    cpu = torch.device("cpu")
    print("starting executors", file=sys.stderr)
    sizing = PoolSizing(BLOCK_BYTES, NUM_BLOCKS * BLOCK_BYTES)
    inline = create_executor("inline", [spec], sizing, cpu)
    mps = create_executor("mps", [spec], sizing, cpu)
    try:
        times: dict[str, list[float]] = {"inline": [], "mps": []}
        next_id = 0
        for ex in (inline, mps):  # warm up: first-call allocations, page faults
            time_jobs(ex, decode_jobs(spec, args.batch, 20, next_id))
            next_id += 20
        for r in range(args.repeats):
            for name, ex in (("inline", inline), ("mps", mps)):
                jobs = decode_jobs(spec, args.batch, args.jobs, next_id)
                next_id += args.jobs
                times[name].append(time_jobs(ex, jobs))
            print(
                f"  repeat {r}: inline {times['inline'][-1] * 1e6:.0f} us/job, "
                f"mps {times['mps'][-1] * 1e6:.0f} us/job",
                file=sys.stderr,
            )
    finally:
        inline.shutdown()
        mps.shutdown()
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    result = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "model": "llama-demo",
        "batch": args.batch,
        "jobs_per_run": args.jobs,
        "repeats": args.repeats,
        "inline_us_per_job": round(med["inline"], 1),
        "mps_us_per_job": round(med["mps"], 1),
        "dispatch_overhead_us_per_job": round(med["mps"] - med["inline"], 1),
        # the same, from each repeat's pair of back-to-back runs: less exposed to drift
        "paired_overhead_us_per_job": round(
            statistics.median(m - i for m, i in zip(times["mps"], times["inline"], strict=True))
            * 1e6,
            1,
        ),
        "mps_to_inline_ratio": round(med["mps"] / med["inline"], 3),
        "runs_us_per_job": {k: [round(t * 1e6, 1) for t in v] for k, v in times.items()},
        "wire": [wire_bytes(spec, 1), wire_bytes(spec, 64)],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs_us_per_job"}, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_executor_batch{args.batch}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
