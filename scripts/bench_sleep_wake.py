"""Sleep and wake times of the demo models on this machine (CPU unless a GPU is there).

For each model and level, `--runs` times: sleep, wake, then one token of a short prompt;
prints medians with the min-max spread and the load average, and writes them as JSON.
`first_ms` is the wake plus that first token (`first_awake_ms`: the same token with the model
awake, the baseline). With `--executor mps` a sleep stops the model's two worker processes
and a wake starts them again and waits for them (`--worker-pool per_model`), or the sleep
detaches the model from the pooled workers and the wake attaches it (`--worker-pool shared`:
no process stops or starts). Level 2's wake reloads the checkpoint (memory-mapped
safetensors: warm in the page cache after the first run). `--attach-wait both` (shared pool)
alternates, run by run, a wake that waits for the pooled workers' `Attached` (the default)
with one that does not (`attach_timeout` 0: the model's first job then pays the build).

    python scripts/bench_sleep_wake.py --runs 5 --out benchmarks/results/elastic/sleep_wake.json
    python scripts/bench_sleep_wake.py --runs 3 --executor mps --worker-pool shared \
        --out benchmarks/results/elastic/sleep_wake_mps_shared.json
    python scripts/bench_sleep_wake.py --runs 5 --executor mps --worker-pool shared \
        --attach-wait both --out benchmarks/results/elastic/sleep_wake_attach_wait.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muxserve.config import parse_config
from muxserve.demo import ensure_demo_models
from muxserve.engine import MuxEngine
from muxserve.executor.mps import ATTACH_TIMEOUT_S
from muxserve.sampling_params import SamplingParams

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--executor", choices=("inline", "mps"), default="inline")
    ap.add_argument("--worker-pool", choices=("per_model", "shared"), default="per_model")
    ap.add_argument("--attach-wait", choices=("on", "both"), default="on")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    models = ensure_demo_models()
    config = parse_config(
        {
            "models": [{"name": n, "path": str(p)} for n, p in models.items()],
            "engine": {
                "device": args.device,
                "executor": args.executor,
                "worker_pool": args.worker_pool,
                "kv_pool_bytes": 8 << 20,
                "block_bytes": 4096,
            },
        }
    )
    engine = MuxEngine(config)
    results = []
    try:
        for name in engine.models:
            size = engine.executor.weight_bytes(name)
            awake = []  # the same token with the model awake all along: the baseline
            for _ in range(args.runs):
                t0 = time.perf_counter()
                engine.generate([[5, 6, 7]], ONE_TOKEN, name)
                awake.append(time.perf_counter() - t0)
            waits = (True, False) if args.attach_wait == "both" else (True,)
            for level in (1, 2):
                sleeps: dict[bool, list[float]] = {w: [] for w in waits}
                wakes: dict[bool, list[float]] = {w: [] for w in waits}
                firsts: dict[bool, list[float]] = {w: [] for w in waits}
                for _ in range(args.runs):
                    for wait in waits:  # interleaved: both see the same load
                        if args.attach_wait == "both":
                            engine.executor.attach_timeout = ATTACH_TIMEOUT_S if wait else 0.0  # type: ignore[attr-defined]
                        t0 = time.perf_counter()
                        engine.sleep(name, level)
                        sleeps[wait].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        wakes[wait].append(engine.wake(name))
                        engine.generate([[5, 6, 7]], ONE_TOKEN, name)
                        firsts[wait].append(time.perf_counter() - t0)
                for wait in waits:
                    row = {
                        "model": name,
                        "weight_mib": round(size / (1 << 20), 2),
                        "level": level,
                        "attach_wait": wait,
                        "sleep_ms": stats_ms(sleeps[wait]),
                        "wake_ms": stats_ms(wakes[wait]),
                        "first_ms": stats_ms(firsts[wait]),
                        "first_awake_ms": stats_ms(awake),
                    }
                    results.append(row)
                    print(
                        f"{name:14s} {row['weight_mib']:7.2f} MiB  level {level}"
                        f"{'' if wait else ' no attach wait'}: "
                        f"sleep {fmt(row['sleep_ms'])}  wake {fmt(row['wake_ms'])}  "
                        f"first token {fmt(row['first_ms'])} (awake {fmt(row['first_awake_ms'])})"
                    )
    finally:
        engine.shutdown()
    load = os.getloadavg()
    print(
        f"runs {args.runs}, device {args.device}, executor {args.executor} "
        f"({args.worker_pool}), "
        f"load average {load[0]:.2f} {load[1]:.2f}"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "command": " ".join(sys.argv),
            "executor": args.executor,
            "worker_pool": args.worker_pool,
            "load_average": load,
            "results": results,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        if args.attach_wait == "both":
            plot_attach_wait(results, load, args.out.with_suffix(".png"))


def plot_attach_wait(results: list[dict], load: tuple[float, ...], path: Path) -> None:
    """Wake and wake-plus-first-token medians (min-max bars), with and without the wait."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["level"]) for r in results}, key=lambda k: (k[1], k[0]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, metric, title in zip(
        axes, ("wake_ms", "first_ms"), ("wake (what it reports)", "wake + first token"), strict=True
    ):
        for i, wait in enumerate((True, False)):
            rows = [
                next(
                    r for r in results if (r["model"], r["level"]) == k and r["attach_wait"] == wait
                )
                for k in keys
            ]
            med = [r[metric]["median"] for r in rows]
            err = [
                [m - r[metric]["min"] for m, r in zip(med, rows, strict=True)],
                [r[metric]["max"] - m for m, r in zip(med, rows, strict=True)],
            ]
            xs = [j + (i - 0.5) * 0.38 for j in range(len(keys))]
            label = "waits for Attached" if wait else "does not wait (before)"
            ax.bar(xs, med, 0.38, yerr=err, capsize=3, label=label)
        ax.set_xticks(range(len(keys)), [f"{m.split('-')[0]}\nL{lv}" for m, lv in keys])
        ax.set_ylabel("ms (median, min-max)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(
        "Pooled-worker wake: waiting for the worker's Attached moves the model's build into "
        f"the wake\n(CPU, demo models, load average {load[0]:.1f})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def stats_ms(xs: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in xs]
    return {
        "median": round(statistics.median(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:8.3f} ms [{s['min']:.3f}-{s['max']:.3f}]"


if __name__ == "__main__":
    main()
