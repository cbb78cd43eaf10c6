"""Engine benchmark: tokens/s under ADBS vs the baselines, and the scheduler's own overhead.

    python scripts/bench_engine.py [--requests 24] [--out benchmarks/results/engine]

1. The same requests over the three demo models, co-located in one engine, under
   adbs+unified (MuxServe), fcfs+unified (temporal) and adbs+static (static KV partition);
   tokens/s and the ratio to fcfs, measured in this one process.
2. schedule() + on_job_done() cost in µs per sequence-step (one request's one decode step)
   at 64, 256 and 1,024 running requests over 4 models, Llama-2-7B's KV layout, a zero-cost
   runner (no torch work at all); the median of `--repeats` runs with the min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from muxserve.config import EngineConfig, SMShare, parse_config
from muxserve.kv.layout import KVLayout
from muxserve.request import Request
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import JobResult, SeqResult
from muxserve.scheduler.model_slot import ModelSlot
from muxserve.scheduler.scheduler import Scheduler

MODES = [("adbs", "unified"), ("fcfs", "unified"), ("adbs", "static")]


def bench_throughput(args: argparse.Namespace) -> list[dict[str, object]]:
    from muxserve.demo import ensure_demo_models
    from muxserve.engine import MuxEngine

    models = ensure_demo_models()
    rng = random.Random(0)
    work = []
    for i in range(args.requests * len(models)):
        name = list(models)[i % len(models)]
        prompt = [rng.randrange(3, 900) for _ in range(rng.randint(16, 128))]
        work.append(
            (
                name,
                prompt,
                SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
            )
        )
    engines = {}
    for policy, kv_mode in MODES:
        config = parse_config(
            {
                "models": [{"name": n, "path": str(p), "rate": 1.0} for n, p in models.items()],
                "engine": {
                    "kv_pool_bytes": args.pool_blocks * 4096,
                    "block_bytes": 4096,
                    "policy": policy,
                    "kv_mode": kv_mode,
                },
            }
        )
        engine = MuxEngine(config)
        engine.generate(["warm up"], SamplingParams(max_tokens=2), next(iter(models)))
        engines[(policy, kv_mode)] = engine
    # modes interleaved, repeated, median: a burst of load from elsewhere hits all modes alike
    times: dict[tuple[str, str], list[float]] = {m: [] for m in MODES}
    jobs: dict[tuple[str, str], int] = {}
    preempts: dict[tuple[str, str], int] = {}
    tokens = 0
    for rep in range(args.repeats):
        for mode, engine in engines.items():
            jobs_before = engine.scheduler.num_jobs_started
            preempt_before = engine.scheduler.num_preemptions
            start = time.perf_counter()
            outs = engine.generate([w[1] for w in work], [w[2] for w in work], [w[0] for w in work])
            times[mode].append(time.perf_counter() - start)
            tokens = sum(len(c.token_ids) for c in outs)
            jobs[mode] = engine.scheduler.num_jobs_started - jobs_before
            preempts[mode] = engine.scheduler.num_preemptions - preempt_before
            print(f"  rep {rep} {mode[0]}+{mode[1]}: {times[mode][-1]:.2f}s", file=sys.stderr)
    rows: list[dict[str, object]] = []
    for (policy, kv_mode), engine in engines.items():
        median = statistics.median(times[(policy, kv_mode)])
        rows.append(
            {
                "policy": policy,
                "kv_mode": kv_mode,
                "requests": len(work),
                "tokens": tokens,
                "seconds": round(median, 3),
                "tokens_per_s": round(tokens / median, 1),
                "jobs": jobs[(policy, kv_mode)],
                "preemptions": preempts[(policy, kv_mode)],
            }
        )
        engine.shutdown()
    base = next(r["tokens_per_s"] for r in rows if r["policy"] == "fcfs")
    for r in rows:
        r["ratio_to_fcfs"] = round(float(r["tokens_per_s"]) / float(base), 3)  # type: ignore[arg-type]
    return rows


def bench_scheduler(running: int, num_models: int, rounds: int) -> dict[str, float]:
    """Steady-state decode rounds with `running` requests over `num_models` models.

    Llama-2-7B's KV layout (32 layers x 32 KV heads: 1,024 block ids per logical block of 128
    tokens), SM shares of 1 / num_models so that every model decodes every round, and a
    zero-cost runner; only `schedule()` and `on_job_done()` are timed.
    """
    share = 1.0 / num_models
    slots = [
        ModelSlot(
            f"m{i}",
            KVLayout(32, 32, 128, 2, 64 << 10),
            1 << 20,
            sm_share=SMShare(prefill=share, decode=share),
        )
        for i in range(num_models)
    ]
    config = EngineConfig(max_batch_size=running, prefill_token_budget=1 << 20)
    max_tokens = 2 * rounds + 256  # more than warm-up and timed rounds take
    logical = -(-(100 + max_tokens) // 128)  # a request's logical blocks at most
    sched = Scheduler.create(slots, running * logical * 1024, config)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(running):
        sched.add_request(Request(f"r{i}", f"m{i % num_models}", [1] * 100, params, float(i), i))

    results = {f"r{i}": SeqResult(f"r{i}", 7) for i in range(running)}  # zero-cost "runner"

    def one_round() -> tuple[float, float, int]:
        """(schedule s, on_job_done s, sequence-steps) of one round."""
        start = time.perf_counter()
        jobs = sched.schedule()
        scheduled = time.perf_counter() - start
        done = [
            (job, JobResult(job.job_id, tuple(results[s.request_id] for s in job.seqs)))
            for job in jobs
        ]
        start = time.perf_counter()
        for job, result in done:
            sched.on_job_done(job, result)
        return scheduled, time.perf_counter() - start, sum(len(job.seqs) for job in jobs)

    while any(not r.is_decoding for q in sched.queues.values() for r in q.running) or any(
        q.waiting for q in sched.queues.values()
    ):
        one_round()
    timed = [one_round() for _ in range(rounds)]
    sched.check_integrity()
    # per round, in us per sequence-step; a round is a few ms, so the lower quantiles are the
    # rounds no other process interrupted
    total = [(a + b) / n * 1e6 for a, b, n in timed]
    quantiles = statistics.quantiles(total, n=10)
    return {
        "running": running,
        "models": num_models,
        "rounds": rounds,
        "seq_steps_per_round": statistics.median(n for _, _, n in timed),
        "us_per_round": round(statistics.median(a + b for a, b, _ in timed) * 1e6, 1),
        "us_per_seq_step": round(statistics.median(total), 3),
        "us_per_seq_step_p10": round(quantiles[0], 3),
        "us_per_seq_step_p90": round(quantiles[-1], 3),
        "schedule_us_per_seq_step": round(statistics.median(a / n * 1e6 for a, _, n in timed), 3),
        "on_job_done_us_per_seq_step": round(
            statistics.median(b / n * 1e6 for _, b, n in timed), 3
        ),
    }


def median_run(run: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    """`run` repeated; the run with the median µs per sequence-step, with the min and max."""
    runs = sorted((run() for _ in range(repeats)), key=lambda r: r["us_per_seq_step"])
    best = dict(runs[len(runs) // 2])
    best["us_per_seq_step_min"] = runs[0]["us_per_seq_step"]
    best["us_per_seq_step_max"] = runs[-1]["us_per_seq_step"]
    best["repeats"] = repeats
    return best


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=24, help="requests per model")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pool-blocks", type=int, default=2048, help="KV pool size in 4 KiB blocks")
    p.add_argument("--rounds", type=int, default=200, help="timed decode rounds per run")
    p.add_argument(
        "--running", type=int, nargs="+", default=[64, 256, 1024], help="running requests"
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode (median)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)"
    )
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default="benchmarks/results/engine")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    result: dict[str, object] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": args.threads,
        "load_average_before": os.getloadavg(),
    }
    print("scheduler overhead (zero-cost runner)", file=sys.stderr)
    overhead = [
        median_run(lambda n=n: bench_scheduler(n, 4, args.rounds), args.repeats)
        for n in args.running
    ]
    result["scheduler_overhead"] = overhead
    heads = ("running", "us/round", "us/seq-step", "(p10-p90)", "(runs)", "schedule", "on_job_done")
    print("".join(f"{h:>13}" for h in heads))
    for o in overhead:
        cells = (
            o["running"],
            o["us_per_round"],
            o["us_per_seq_step"],
            f"{o['us_per_seq_step_p10']}-{o['us_per_seq_step_p90']}",
            f"{o['us_per_seq_step_min']}-{o['us_per_seq_step_max']}",
            o["schedule_us_per_seq_step"],
            o["on_job_done_us_per_seq_step"],
        )
        print("".join(f"{c!s:>13}" for c in cells))
    if not args.skip_throughput:
        print("throughput on the demo models", file=sys.stderr)
        rows = bench_throughput(args)
        result["throughput"] = rows
        heads = ("policy", "kv_mode", "tokens", "seconds", "tok/s", "vs fcfs", "jobs", "preempt")
        print("\n" + "".join(f"{h:>9}" for h in heads))
        for r in rows:
            keys = ("policy", "kv_mode", "tokens", "seconds", "tokens_per_s", "ratio_to_fcfs")
            print("".join(f"{r[k]!s:>9}" for k in (*keys, "jobs", "preemptions")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_engine.json"
    if args.skip_throughput and path.exists():
        # a scheduler-only run keeps the throughput measured last, with that run's load
        before = json.loads(path.read_text())
        if "throughput" in before:
            result["throughput"] = before["throughput"]
            result["throughput_load_average_before"] = before.get(
                "throughput_load_average_before", before["load_average_before"]
            )
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
