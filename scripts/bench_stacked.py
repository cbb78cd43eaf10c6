"""One `Stacked` call, and the engine's decode step, with the stack bound at placement against
the per-call address key it replaced.

    python scripts/bench_stacked.py                  # 30m, batch 1 x context 128
    python scripts/bench_stacked.py --rounds 30 --pairs 200

The baseline (`keyed_call`) is the former `Stacked.__call__`: it built every weight's address
into a tuple on each call and compared it with the last one. Both run in one process on the
same weights, interleaved, the order flipped each round (micro) or each pair of steps
(decode), one torch thread, timed by the thread's CPU time (what other processes on a loaded
machine cannot add to, except through caches and memory bandwidth). Reports medians with
quartiles and the paired ratios bound / keyed, with the load average; `--out` writes JSON and
a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_decode import (  # noqa: E402
    EngineSide,
    Point,
    bench_engine,
    prompts,
    ratio_stats,
    write_checkpoint,
)
from bench_vs_hf import SIZES  # noqa: E402

from muxserve.engine import MuxEngine  # noqa: E402
from muxserve.models.stacked import STACK_ROWS, Stacked, stacks_in  # noqa: E402

BOUND = Stacked.__call__


def keyed_call(self: Any, x: Tensor) -> list[Tensor]:
    """The former `Stacked.__call__` (the baseline): every weight's address, every call."""
    if x.numel() > STACK_ROWS * x.shape[-1]:
        return [m(x) for m in self.linears]
    key = tuple(w.data_ptr() for w in self.weights())
    if key != self._key:
        self._key, self._stack = key, self._find()
    if self._stack is None:
        return [m(x) for m in self.linears]
    weight, bias = self._stack
    return list(F.linear(x, weight, bias).split(self.sizes, dim=-1))


VARIANTS = {"bound": BOUND, "keyed": keyed_call}


def stats(values: list[float]) -> dict[str, float]:
    return ratio_stats(values)  # median, q1, q3


def micro(engine: MuxEngine, rounds: int, calls: int) -> dict[str, Any]:
    """µs per call of the first layer's q/k/v stack at one row, each variant `calls` calls a
    round, interleaved."""
    model = engine.executor.runners["bench"].model  # type: ignore[attr-defined]
    stack = stacks_in(model)[0]
    x = torch.randn(1, stack.weights()[0].shape[1])
    per: dict[str, list[float]] = {k: [] for k in VARIANTS}
    ratios: list[float] = []
    with torch.inference_mode():
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            got: dict[str, float] = {}
            for name in order:
                call = VARIANTS[name]
                call(stack, x)
                start = time.thread_time()
                for _ in range(calls):
                    call(stack, x)
                got[name] = (time.thread_time() - start) / calls * 1e6
                per[name].append(got[name])
            ratios.append(got["bound"] / got["keyed"])
    diffs = [k - b for k, b in zip(per["keyed"], per["bound"], strict=True)]
    return {
        "us_per_call": {k: stats(v) for k, v in per.items()},
        "saved_us": stats(diffs),
        "ratio": stats(ratios),
    }


def decode(side: EngineSide, pairs: int) -> dict[str, Any]:
    """Thread CPU ms per decode step under each variant, alternating, order flipped per pair."""
    per: dict[str, list[float]] = {k: [] for k in VARIANTS}
    ratios: list[float] = []
    for i in range(pairs):
        order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
        got: dict[str, float] = {}
        for name in order:
            Stacked.__call__ = VARIANTS[name]  # type: ignore[method-assign]
            start = time.thread_time()
            side.step()
            got[name] = (time.thread_time() - start) * 1e3
            per[name].append(got[name])
        ratios.append(got["bound"] / got["keyed"])
    Stacked.__call__ = BOUND  # type: ignore[method-assign]
    return {"ms_per_step": {k: stats(v) for k, v in per.items()}, "ratio": stats(ratios)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=sorted(SIZES), default="30m")
    p.add_argument("--point", type=Point.parse, default=Point(1, 128))
    p.add_argument("--rounds", type=int, default=30, help="micro-benchmark rounds")
    p.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    p.add_argument("--pairs", type=int, default=200, help="decode steps per variant")
    p.add_argument("--out", default=None, help="JSON file; a PNG is written next to it")
    args = p.parse_args(argv)
    size, point = SIZES[args.model], args.point
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    total = 2 * args.pairs + 16
    with tempfile.TemporaryDirectory(prefix="bench-stacked-") as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, argparse.Namespace(**vars(size)))
        tokens = point.batch * (point.prompt + total + 16)
        engine = bench_engine(
            folder,
            tokens * size.kv_bytes_per_token() * 5 // 4 + (16 << 20),
            point.batch * point.prompt,
            point.batch,
            None,
        )
        try:
            for s in stacks_in(engine.executor.runners["bench"].model):  # type: ignore[attr-defined]
                s._key = None  # type: ignore[attr-defined]  # the baseline's state
            side = EngineSide(engine, prompts(point, seed=7), max_tokens=total)
            for _ in range(8):  # warm
                side.step()
            result = {
                "model": args.model,
                "point": str(point),
                "micro": micro(engine, args.rounds, args.calls),
                "decode": decode(side, args.pairs),
            }
            side.finish()
        finally:
            engine.shutdown()
    result["load"] = {"before": load_before, "after": os.getloadavg()}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        plot(result, Path(args.out).with_suffix(".png"))
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (part, unit, key) in zip(
        axes,
        [
            ("micro", "µs per call (q/k/v, 1 row)", "us_per_call"),
            ("decode", "ms per step", "ms_per_step"),
        ],
        strict=True,
    ):
        data = result[part][key]
        names = list(data)
        med = [data[n]["median"] for n in names]
        err = [[m - data[n]["q1"] for n, m in zip(names, med, strict=True)],
               [data[n]["q3"] - m for n, m in zip(names, med, strict=True)]]  # fmt: skip
        ax.bar(names, med, yerr=err, capsize=4, color=["tab:green", "tab:gray"])
        r = result[part]["ratio"]
        ax.set_title(f"{part}: bound/keyed {r['median']:.3f} ({r['q1']:.3f}-{r['q3']:.3f})")
        ax.set_ylabel(unit)
    load = result["load"]
    fig.suptitle(
        f"Stacked bound at placement vs per-call key, {result['model']} {result['point']}, "
        f"thread CPU time, median + IQR, load {load['before'][0]:.1f}->{load['after'][0]:.1f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
