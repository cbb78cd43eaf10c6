"""Worker processes against the model count: per-model workers (eager, lazy) vs pooled ones.

    python scripts/bench_workers.py [--models 3,12,48] [--asked 3]
                                    [--modes eager,lazy,shared,shared-lazy]
                                    [--out benchmarks/results/workers]

For each model count N, a `muxserve serve` process (mps executor, CPU) serves N copies of the
demo models under different names, once per mode: `eager` (`worker_start: eager`: every
model's prefill and decode workers start with the engine), `lazy` (`worker_start: lazy`: a
model's workers start at its first job; `worker_idle_stop_s` stops them again), `shared`
(`worker_pool: shared`: one prefill and one decode worker that every model attaches to,
started with the engine) and `shared-lazy` (the same, started at the first job). Measured per
run:

- startup: from launching the server until /health answers "ok" (loading N models included);
- processes and host memory (the sum of PSS over the server and its descendants, so shared
  weights count once) right after startup;
- the same after one request to each of --asked models (lazy: their workers now run), and
  each first request's latency (lazy: it waits for its workers to start);
- at the first model count only (it involves the --asked models alone, whatever N): a burst
  of 4 concurrent 16-token requests to each of the --asked models, 3 times (median, min,
  max): per-model workers run those models' jobs side by side, pooled ones one after another
  in each phase's worker, so this is what pooling costs (or saves) in concurrency here.

An eager per-model run whose workers would not fit in this host's available memory (about
230 MiB each, mostly the torch import) is skipped and reported as such. JSON and a PNG go to --out.
Not a test: the numbers depend on who else uses the machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from muxserve.bench.processes import descendants
from muxserve.bench.report import machine, write_json
from muxserve.bench.server import ServerProcess
from muxserve.config import dump_config, parse_config
from muxserve.demo import DEMO_ENGINE, ensure_demo_models

BURST_PER_MODEL, BURST_TOKENS, BURSTS = 4, 16, 3
WORKER_BYTES = 230 << 20  # host memory of one idle CPU worker process, measured
STARTUP_TIMEOUT_S = 1200.0


MODES = ("eager", "lazy", "shared", "shared-lazy")


def config_for(n: int, mode: str, models: dict[str, Path]) -> dict[str, Any]:
    lazy = mode.endswith("lazy")
    bases = sorted(models)
    entries = [
        {"name": f"{bases[i % len(bases)]}-{i}", "path": str(models[bases[i % len(bases)]])}
        for i in range(n)
    ]
    engine = {
        **DEMO_ENGINE,
        "device": "cpu",
        "executor": "mps",
        "kv_pool_bytes": 16 << 20,
        "worker_start": "lazy" if lazy else "eager",
        "worker_idle_stop_s": 300.0 if lazy else None,
        "worker_pool": "shared" if mode.startswith("shared") else "per_model",
    }
    return {"models": entries, "engine": engine}


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant of it (multiprocessing's resource tracker left out)."""
    kids = [p for p, cmd in descendants(pid).items() if "resource_tracker" not in cmd]
    return [pid, *kids]


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def snapshot(server_pid: int) -> dict[str, Any]:
    pids = tree(server_pid)
    return {"processes": len(pids), "workers": len(pids) - 1, "pss_mib": pss_bytes(pids) >> 20}


def one_request(url: str, model: str, max_tokens: int = 4) -> float:
    body = json.dumps(
        {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens}
    ).encode()
    req = urllib.request.Request(
        f"{url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - start


def burst(url: str, names: list[str]) -> float:
    """Seconds for BURST_PER_MODEL concurrent requests to each of `names` (their workers run
    already): what serving several busy models at once costs in this mode."""
    jobs = [m for m in names for _ in range(BURST_PER_MODEL)]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda m: one_request(url, m, BURST_TOKENS), jobs))
    return time.perf_counter() - start


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run(
    n: int, mode: str, asked: int, models: dict[str, Path], tmp: Path, bursts: bool
) -> dict[str, Any]:
    need = 2 * n * WORKER_BYTES
    if mode == "eager" and need > 0.8 * available_bytes():
        return {
            "models": n,
            "mode": mode,
            "skipped": f"{2 * n} workers need ~{need >> 30} GiB; "
            f"{available_bytes() >> 30} GiB available",
        }
    cfg = tmp / f"{mode}-{n}.yaml"
    dump_config(parse_config(config_for(n, mode, models)), cfg)
    log = (tmp / f"{mode}-{n}.log").open("w")
    server = ServerProcess(cfg, log=log, startup_timeout=STARTUP_TIMEOUT_S)
    start = time.perf_counter()
    try:
        url = server.start()
        startup = time.perf_counter() - start
        assert server.proc is not None
        out: dict[str, Any] = {"models": n, "mode": mode, "startup_s": round(startup, 2)}
        out["at_start"] = snapshot(server.proc.pid)
        names = [f"{sorted(models)[i % len(models)]}-{i}" for i in range(min(asked, n))]
        first = [one_request(url, m) for m in names]
        out["first_request_s"] = [round(t, 2) for t in first]
        out["after_requests"] = snapshot(server.proc.pid)
        if bursts:
            times = sorted(burst(url, names) for _ in range(BURSTS))
            mid = round(times[len(times) // 2], 2)
            out["burst_s"] = {"median": mid, "min": round(times[0], 2), "max": round(times[-1], 2)}
        return out
    finally:
        server.stop()
        log.close()


def plot(results: list[dict[str, Any]], path: Path, asked: int, load: tuple[float, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    colors = ("tab:red", "tab:blue", "tab:green", "tab:olive")
    for mode, color in zip(MODES, colors, strict=True):
        rows = [r for r in results if r["mode"] == mode and "skipped" not in r]
        xs = [r["models"] for r in rows]
        axes[0].plot(xs, [r["at_start"]["processes"] for r in rows], "o-", color=color, label=mode)
        axes[0].plot(
            xs,
            [r["after_requests"]["processes"] for r in rows],
            "x--",
            color=color,
            label=f"{mode}, {asked} models asked",
        )
        axes[1].plot(xs, [r["at_start"]["pss_mib"] for r in rows], "o-", color=color, label=mode)
        axes[2].plot(xs, [r["startup_s"] for r in rows], "o-", color=color, label=mode)
        bursts = [r for r in rows if "burst_s" in r]
        for r in bursts:
            b = r["burst_s"]
            err = [[b["median"] - b["min"]], [b["max"] - b["median"]]]
            axes[3].errorbar(
                [mode], [b["median"]], yerr=err, fmt="o", color=color, capsize=4, label=mode
            )
    for ax, title in zip(
        axes,
        (
            "processes",
            "host memory at start (PSS, MiB)",
            "startup until /health ok (s)",
            f"burst: {BURST_PER_MODEL} requests x {asked} models, first N (s)",
        ),
        strict=True,
    ):
        ax.set_title(title)
        ax.set_xlabel("models on the mesh")
        ax.legend()
    axes[3].set_xlabel("mode (at the first model count)")
    loads = ", ".join(f"{x:.1f}" for x in load)
    fig.suptitle(
        f"mps workers: per model (eager, lazy) vs pooled, demo model copies on CPU (load {loads})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="3,12,48", help="model counts, comma-separated")
    p.add_argument("--asked", type=int, default=3, help="models sent a request (lazy runs)")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parent.parent / "benchmarks/results/workers")
    )
    args = p.parse_args()
    models = ensure_demo_models()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="muxserve-workers-") as tmp:
        counts = [int(x) for x in args.models.split(",")]
        for n in counts:
            for mode in args.modes.split(","):
                print(f"[{mode} {n}] starting", file=sys.stderr, flush=True)
                if mode not in MODES:
                    p.error(f"--modes: unknown mode {mode!r}; use {', '.join(MODES)}")
                r = run(n, mode, args.asked, models, Path(tmp), n == counts[0])
                print(f"[{mode} {n}] {json.dumps(r)}", file=sys.stderr, flush=True)
                results.append(r)
    report = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "results": results,
    }
    write_json(out / "workers.json", report)
    plot(results, out / "workers.png", args.asked, report["load_average_end"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
