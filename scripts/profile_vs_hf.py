"""Side by side, op by op: where a MuxEngine decode step and HF transformers' differ in time.

    python scripts/profile_vs_hf.py                         # 150M, batch 16 x context 128
    python scripts/profile_vs_hf.py --model 30m --point 32x128 --steps 60

The setting of `scripts/bench_vs_hf.py` (same random checkpoint, prompts, one torch thread,
float32): both sides prefill, then decode step by step, alternating and flipping the order
every step. Two measurements:

1. Timing (`--steps` pairs): each step's wall time (`perf_counter`) and the calling thread's
   CPU time (`time.thread_time`: what other processes on a loaded machine cannot add to,
   except through caches and memory bandwidth). Reported as median and IQR of each side and
   of the paired ratios engine / HF.
2. Op by op (`--profile-steps` pairs after the timing, interleaved likewise): each step under
   a torch dispatch mode that reads the thread's CPU time around every aten op (`OpClock`;
   the profiler's wall times count the slices other processes take). Per op, ms per step of
   both sides in one table sorted by the difference; `linear` and the matmuls are split by
   shapes (activation x weight), which tells which projection differs. `(outside ops)` is
   the step's time in Python (model code, scheduler, sampling, detokenizing), net of what
   the clock adds per op (`(clock)`).

Prints the tables; `--out` takes a JSON of both measurements and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_decode import (  # noqa: E402
    EngineSide,
    HFSide,
    Point,
    bench_engine,
    prompts,
    ratio_stats,
    write_checkpoint,
)
from bench_vs_hf import SIZES  # noqa: E402

MATMULS = ("linear", "mm", "addmm", "bmm", "matmul")


def time_pairs(hf: HFSide, side: EngineSide, steps: int) -> dict[str, Any]:
    """`steps` interleaved pairs: wall and thread CPU time of each side, and paired ratios."""
    walls: dict[str, list[float]] = {"hf": [], "engine": []}
    cpus: dict[str, list[float]] = {"hf": [], "engine": []}
    for i in range(steps):
        order = (("hf", hf.step), ("engine", side.step))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            walls[name].append((time.perf_counter() - w0) * 1e3)
            cpus[name].append((time.thread_time() - c0) * 1e3)
    out: dict[str, Any] = {}
    for kind, values in (("wall_ms", walls), ("cpu_ms", cpus)):
        ratios = [e / h for e, h in zip(values["engine"], values["hf"], strict=True)]
        out[kind] = {"hf": ratio_stats(values["hf"]), "engine": ratio_stats(values["engine"])}
        out[kind]["ratio"] = ratio_stats(ratios)
    return out


class OpClock(TorchDispatchMode):
    """Thread CPU time of every aten op run under it, by op (matmuls by their shapes).

    Below autograd's composites, so `linear` shows as the `mm` it runs; each op's own time,
    since the kernels an op calls do not come back through the mode. Thread CPU time, unlike
    the profiler's wall time, does not count the time slices other processes take.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ms: dict[str, float] = defaultdict(float)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if name in MATMULS:
            name += "x".join(str(tuple(a.shape)) for a in args[:3] if isinstance(a, torch.Tensor))
        self.ms[name] += (time.thread_time() - start) * 1e3
        self.count += 1
        return out


def clock_cost_ms(calls: int = 2000) -> float:
    """What an `OpClock` adds to each op it times (ms): a cheap op, clocked against not."""
    x = torch.zeros(4)
    start = time.thread_time()
    for _ in range(calls):
        x.view(-1)
    bare = time.thread_time() - start
    with OpClock():
        start = time.thread_time()
        for _ in range(calls):
            x.view(-1)
        clocked = time.thread_time() - start
    return max(0.0, clocked - bare) * 1e3 / calls


def profile(
    hf: HFSide, side: EngineSide, steps: int
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """`steps` interleaved pairs, each step under an `OpClock`: per side, thread CPU ms per
    step by op, `(outside ops)`: the rest of the step (Python), less `(clock)`: what the
    clock itself added (its cost per op times the ops), and `(ops per step)` (a count)."""
    cost = clock_cost_ms()
    ops: dict[str, dict[str, float]] = {"hf": defaultdict(float), "engine": defaultdict(float)}
    steps_ms = {"hf": 0.0, "engine": 0.0}
    order = (("hf", hf.step), ("engine", side.step))
    for i in range(steps):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            clock = OpClock()
            start = time.thread_time()
            with clock:
                fn()
            steps_ms[name] += (time.thread_time() - start) * 1e3 / steps
            for op, ms in clock.ms.items():
                ops[name][op] += ms / steps
            ops[name]["(clock)"] += clock.count * cost / steps
            ops[name]["(ops per step)"] += clock.count / steps
    for name, table_ in ops.items():
        counted = sum(v for k, v in table_.items() if k != "(ops per step)")
        table_["(outside ops)"] = steps_ms[name] - counted
    return {k: dict(v) for k, v in ops.items()}, steps_ms


def table(hf_ops: dict[str, float], ours: dict[str, float], top: int) -> list[dict[str, Any]]:
    names = set(hf_ops) | set(ours)
    rows = [{"op": n, "hf_ms": hf_ops.get(n, 0.0), "engine_ms": ours.get(n, 0.0)} for n in names]
    for r in rows:
        r["diff_ms"] = r["engine_ms"] - r["hf_ms"]
    rows.sort(key=lambda r: -abs(r["diff_ms"]))
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(SIZES), default="150m")
    p.add_argument("--point", type=Point.parse, default=Point(16, 128))
    p.add_argument("--steps", type=int, default=40, help="timed pairs of steps")
    p.add_argument("--profile-steps", type=int, default=10, help="profiled steps per side")
    p.add_argument("--top", type=int, default=30, help="ops in the table")
    p.add_argument("--block-bytes", type=int, default=16 << 10)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    size, point = SIZES[args.model], args.point
    load_before = os.getloadavg()
    total_steps = args.steps + 2 * args.profile_steps + 16
    with tempfile.TemporaryDirectory(prefix="profile-vs-hf-") as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, argparse.Namespace(**vars(size)))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        tokens = point.batch * (point.prompt + total_steps + 16)
        engine = bench_engine(
            folder,
            tokens * size.kv_bytes_per_token() * 5 // 4 + (16 << 20),
            point.batch * point.prompt,
            point.batch,
            args.block_bytes,
        )
        try:
            batch = prompts(point, seed=point.batch * 100_003 + point.prompt)
            torch.set_num_threads(os.cpu_count() or 1)
            hf = HFSide(hf_model, batch, 8192)
            side = EngineSide(engine, batch, max_tokens=total_steps)
            torch.set_num_threads(1)
            for _ in range(3):  # warm both
                hf.step()
                side.step()
            timing = time_pairs(hf, side, args.steps)
            ops, walls = profile(hf, side, args.profile_steps)
            hf_ops, our_ops = ops["hf"], ops["engine"]
            hf_wall, our_wall = walls["hf"], walls["engine"]
            side.finish()
        finally:
            engine.shutdown()
    rows = table(hf_ops, our_ops, args.top)
    load_after = os.getloadavg()
    print(f"{args.model} {point}, load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    for kind in ("wall_ms", "cpu_ms"):
        t = timing[kind]
        print(
            f"{kind:>8}: hf {t['hf']['median']:.2f} ({t['hf']['q1']:.2f}-{t['hf']['q3']:.2f}), "
            f"engine {t['engine']['median']:.2f} "
            f"({t['engine']['q1']:.2f}-{t['engine']['q3']:.2f}), ratio "
            f"{t['ratio']['median']:.3f} ({t['ratio']['q1']:.3f}-{t['ratio']['q3']:.3f})"
        )
    clock, count = "(clock)", "(ops per step)"
    print(
        f"clocked step, thread CPU ms: hf {hf_wall:.2f}, engine {our_wall:.2f}; clock overhead "
        f"hf {hf_ops[clock]:.2f}, engine {our_ops[clock]:.2f}; ops per step hf "
        f"{hf_ops[count]:.0f}, engine {our_ops[count]:.0f}"
    )
    print(f"{'op':<72}{'hf ms':>9}{'engine ms':>11}{'diff':>8}")
    for r in rows:
        print(f"{r['op'][:71]:<72}{r['hf_ms']:>9.3f}{r['engine_ms']:>11.3f}{r['diff_ms']:>+8.3f}")
    if args.out:
        result = {
            "command": " ".join(["python", "scripts/profile_vs_hf.py", *(argv or sys.argv[1:])]),
            "model": args.model,
            "point": str(point),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "timing": timing,
            "profiled_step_ms": {"hf": hf_wall, "engine": our_wall},
            "ops_ms_per_step": {"hf": hf_ops, "engine": our_ops},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
