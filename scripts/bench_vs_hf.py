"""The decode-step grid of issue 11: MuxEngine against Hugging Face transformers (DynamicCache).

    python scripts/bench_vs_hf.py                  # 2 models x batch 1/16/32 x context 128/512/2048
    python scripts/bench_vs_hf.py --quick          # a smoke test of a few seconds
    python scripts/bench_vs_hf.py --merge A.json B.json   # runs of parts of the grid, as one

For each model size (`--models`: a ~30M-parameter Llama with full multi-head attention and a
~150M one with grouped-query attention, 4 KV heads; both seeded random weights in the Hugging
Face layout, written to a temporary folder), both sides load the same checkpoint in float32
and, for each cell (batch x context), prefill the same prompts and decode greedily step by
step: one HF forward over its DynamicCache plus an argmax against one `MuxEngine.step()`. The
timing is `scripts/bench_decode.py`'s: one torch thread per side in this one process, the two
sides alternating step by step with the order flipping every step, `--repeats` blocks of
`--steps` steps, and a pass reading every weight timed between steps (the floor a batch-1
step tends to). Prefill is not timed; it may use more threads (`--prefill-threads`), and HF's
is cut into chunks of `--hf-chunk-tokens` tokens so its activations stay small.

Reported per cell: the median decode step of each side with its p10-p90, the median of the
paired ratios engine / HF with their quartiles and the min-max of the per-repeat medians, the
same in the timing thread's CPU time (`cpu_ratio`: on a loaded machine the time slices other
processes take inflate wall times, not these), the engine's step against the weight read
(`engine_vs_weights_read`, medians of wall times; `engine_vs_weights_read_cpu`, paired ratios
of thread CPU times with quartiles), the rows whose greedy tokens agree (random
weights leave near-ties that rounding may flip), and the load average before and after.
Written to `--out`: `bench_vs_hf.json` after every cell (`"complete": false` until the last),
and `bench_vs_hf.png` (the ratio per cell, one panel per model) at the end. Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # this checkout's muxserve; bench_decode

from bench_decode import Point, bench_engine, bench_point, write_checkpoint  # noqa: E402


@dataclass(frozen=True)
class ModelSize:
    """A random Llama's shape; `bench_decode.write_checkpoint` reads these fields."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 4096

    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        layer = attn + mlp + 2 * self.hidden
        return self.layers * layer + 2 * self.vocab * self.hidden + self.hidden

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * (self.hidden // self.heads) * 4  # float32


SIZES = {
    "30m": ModelSize("30m", hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8,
                     vocab=16000),
    "150m": ModelSize("150m", hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4,
                      vocab=32000),
    # --quick
    "tiny": ModelSize("tiny", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4,
                      vocab=1000, max_positions=256),
    "tiny-gqa": ModelSize("tiny-gqa", hidden=128, intermediate=256, layers=2, heads=4,
                          kv_heads=2, vocab=1000, max_positions=256),
}  # fmt: skip


def bench_model(
    size: ModelSize,
    args: argparse.Namespace,
    log: Any,
    models: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Every cell of the grid on one model size (a checkpoint, HF's model, one engine),
    appended to `models`; `save()` after each cell, so a run cut short keeps what it has."""
    import transformers

    cells = [Point(b, c) for b in args.batches for c in args.contexts]
    longest = max(c.batch * (c.prompt + args.steps * args.repeats + 16) for c in cells)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-hf-") as tmp:
        folder = Path(tmp)
        config = write_checkpoint(folder, argparse.Namespace(**vars(size)))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=args.attn
        ).eval()
        models.append(
            {
                "name": size.name,
                "config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
                | {
                    "intermediate_size": size.intermediate,
                    "heads": size.heads,
                    "kv_heads": size.kv_heads,
                },
                "parameters": sum(x.numel() for x in hf_model.parameters()),
                "cells": rows,
            }
        )
        # one cell at a time: each aborts its requests before the next; one prefill job per
        # cell: every row starts decoding at one length, as HF's do
        engine = bench_engine(
            folder,
            longest * size.kv_bytes_per_token() * 5 // 4 + (16 << 20),
            max(c.batch * c.prompt for c in cells),
            max(c.batch for c in cells),
            args.block_bytes,
        )
        try:
            ours = engine.executor.runners["bench"].model  # type: ignore[attr-defined]
            for n, cell in enumerate(cells, 1):
                print(f"[{size.name}] cell {n}/{len(cells)}: batch x context {cell}", file=log)
                load_before = os.getloadavg()
                start = time.perf_counter()
                row = bench_point(
                    cell, hf_model, engine, ours, args, args.prefill_threads, args.hf_chunk_tokens
                )
                row["seconds"] = round(time.perf_counter() - start, 1)
                row["load_average_before"] = load_before
                row["load_average_after"] = os.getloadavg()
                q, c = row["ratio"], row["cpu_ratio"]
                print(
                    f"[{size.name}] {cell}: hf {row['hf_ms']['median']:.1f} ms, engine "
                    f"{row['engine_ms']['median']:.1f} ms, ratio {q['median']:.3f} "
                    f"(IQR {q['q1']:.3f}-{q['q3']:.3f}), thread CPU ratio {c['median']:.3f} "
                    f"(IQR {c['q1']:.3f}-{c['q3']:.3f}), {row['seconds']:.0f} s, load "
                    f"{load_before[0]:.1f}",
                    file=log,
                )
                rows.append(row)
                save()
        finally:
            engine.shutdown()
            del hf_model


LOAD_KEYS = ("load_average_before", "load_average_after")


def plot(result: dict[str, Any], file: Path) -> None:
    """Ratio engine / HF per cell, one panel per model: below 1 the engine is faster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    models = result["models"]
    fig, axes = plt.subplots(
        1,
        len(models),
        figsize=(max(4.6 * len(models), 7.5), 4.6),
        squeeze=False,
        layout="constrained",
    )
    norm = TwoSlopeNorm(vmin=0.25, vcenter=1.0, vmax=1.75)
    image = None
    for ax, model in zip(axes[0], models, strict=True):
        batches = sorted({c["batch"] for c in model["cells"]})
        contexts = sorted({c["prompt"] for c in model["cells"]})
        grid = [[float("nan")] * len(contexts) for _ in batches]
        for c in model["cells"]:
            q = c["ratio"]
            i, j = batches.index(c["batch"]), contexts.index(c["prompt"])
            grid[i][j] = q["median"]
            ax.text(
                j, i, f"{q['median']:.2f}x\n{q['q1']:.2f}-{q['q3']:.2f}",
                ha="center", va="center", fontsize=9,
            )  # fmt: skip
        image = ax.imshow(grid, cmap="RdYlGn_r", norm=norm, origin="lower", aspect="auto")
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel("batch")
        ax.set_title(
            f"{model['name']}: {model['parameters'] / 1e6:.3g}M parameters, "
            f"{model['config']['kv_heads']}/{model['config']['heads']} KV heads",
            fontsize=10,
        )
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="engine / HF decode step (median)")
    loads = [result["load_average_before"][0], result["load_average_after"][0]]
    loads += [c[k][0] for m in models for c in m["cells"] for k in LOAD_KEYS]
    lo, hi = min(loads), max(loads)  # 1-minute load average at the start, end and every cell
    fig.suptitle(
        "MuxEngine vs HF transformers (DynamicCache): decode step time, engine / HF\n"
        f"one torch thread each, interleaved, {result['repeats']} x {result['steps']} steps; "
        f"median, IQR below; load average {lo:.1f}-{hi:.1f}",
        fontsize=10,
    )
    fig.savefig(file, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=sorted(SIZES),
        default=None,
        help="model sizes (default 30m 150m; tiny tiny-gqa with --quick)",
    )
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 16 32")
    p.add_argument("--contexts", nargs="+", type=int, default=None, help="default 128 512 2048")
    p.add_argument("--steps", type=int, default=None, help="decode steps per repeat (8)")
    p.add_argument("--repeats", type=int, default=None, help="(3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    p.add_argument(
        "--prefill-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads for the untimed prefills",
    )
    p.add_argument(
        "--hf-chunk-tokens",
        type=int,
        default=8192,
        help="HF prefills this many tokens of the batch per forward at most",
    )
    p.add_argument("--block-bytes", type=int, default=16 << 10, help="the engine's block size")
    p.add_argument("--attn", default="sdpa", help="transformers' attn_implementation")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, batch 1/2, context 16/40, 2 x 2 steps: a smoke test",
    )
    p.add_argument("--out", default="benchmarks/results/speed")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="measure nothing: combine these runs' complete cells into one grid (a cell "
        "measured twice keeps the later file's) and write its JSON and plot to --out",
    )
    args = p.parse_args(argv)
    if args.merge:
        return args
    quick = args.quick
    defaults = {
        "models": ["tiny", "tiny-gqa"] if quick else ["30m", "150m"],
        "batches": [1, 2] if quick else [1, 16, 32],
        "contexts": [16, 40] if quick else [128, 512, 2048],
        "steps": 2 if quick else 8,
        "repeats": 2 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "repeats", "threads", "prefill_threads", "hf_chunk_tokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if min(args.batches) < 1 or min(args.contexts) < 1:
        p.error("batches and contexts must be at least 1")
    for name in args.models:
        size = SIZES[name]
        if max(args.contexts) + args.steps * args.repeats + 16 > size.max_positions:
            p.error(f"context {max(args.contexts)} does not fit model {name}'s positions")
    return args


def merge(files: list[Path]) -> dict[str, Any]:
    """One grid from several runs' JSON: their cells by model and point, in batch x context
    order; each run's command, repeats and load averages are kept, in `runs`."""
    runs = [json.loads(f.read_text()) for f in files]
    for f, run in zip(files, runs, strict=True):
        if not run.get("complete"):
            raise ValueError(f"{f}: an unfinished run (complete is false)")
    models: dict[str, dict[str, Any]] = {}
    for run in runs:
        for model in run["models"]:
            into = models.setdefault(model["name"], {**model, "cells": []})
            if into["config"] != model["config"]:
                raise ValueError(f"model {model['name']}: the runs used different configs")
            cells = {c["point"]: c for c in into["cells"]}
            cells.update({c["point"]: c for c in model["cells"]})
            into["cells"] = sorted(cells.values(), key=lambda c: (c["batch"], c["prompt"]))
    repeats = sorted({r["repeats"] for r in runs})
    steps = sorted({r["steps"] for r in runs})
    loads = [r[k] for r in runs for k in ("load_average_before", "load_average_after")]
    return {
        **{k: v for k, v in runs[0].items() if k not in ("models", "command")},
        "command": "python scripts/bench_vs_hf.py --merge " + " ".join(str(f) for f in files),
        "repeats": "/".join(map(str, repeats)),
        "steps": "/".join(map(str, steps)),
        "load_average_before": min(loads),
        "load_average_after": max(loads),
        "runs": [{k: v for k, v in r.items() if k != "models"} for r in runs],
        "models": list(models.values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            result = merge([Path(f) for f in args.merge])
        except (OSError, ValueError, KeyError) as e:
            print(f"bench_vs_hf --merge: {e}", file=sys.stderr)
            return 2
        (out / "bench_vs_hf.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out / "bench_vs_hf.png")
        print(f"wrote {out / 'bench_vs_hf.json'} and {out / 'bench_vs_hf.png'}", file=sys.stderr)
        return 0
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values' rename
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    models: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "command": " ".join(["python", "scripts/bench_vs_hf.py", *(argv or sys.argv[1:])]),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": args.threads,
        "prefill_threads": args.prefill_threads,
        "hf_attn_implementation": args.attn,
        "dtype": "float32",
        "block_bytes": args.block_bytes,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": None,
        "complete": False,  # until every cell is in
        "models": models,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["load_average_after"] = os.getloadavg()
        (out / "bench_vs_hf.json").write_text(json.dumps(result, indent=2) + "\n")

    for name in args.models:
        bench_model(SIZES[name], args, sys.stderr, models, save)
    result["complete"] = True
    save()
    plot(result, out / "bench_vs_hf.png")
    print(f"{'model':>8}{'cell':>10}{'hf ms':>10}{'engine ms':>11}{'ratio':>8}"
          f"{'IQR':>14}{'rep min-max':>14}{'cpu ratio':>10}{'IQR':>14}{'vs read':>9}"
          f"{'cpu':>7}{'same':>6}{'load':>6}")  # fmt: skip
    for model in models:
        for c in model["cells"]:
            q = c["ratio"]
            print(
                f"{model['name']:>8}{c['point']:>10}{c['hf_ms']['median']:>10.1f}"
                f"{c['engine_ms']['median']:>11.1f}{q['median']:>7.2f}x"
                f"{q['q1']:>7.2f}-{q['q3']:.2f}{q['rep_min']:>8.2f}-{q['rep_max']:.2f}"
                f"{c['cpu_ratio']['median']:>9.2f}x"
                f"{c['cpu_ratio']['q1']:>7.2f}-{c['cpu_ratio']['q3']:.2f}"
                f"{c['engine_vs_weights_read']:>8.2f}x"
                f"{c['engine_vs_weights_read_cpu']['median']:>6.2f}x"
                f"{c['rows_same_tokens']:>4}/{c['batch']}{c['load_average_before'][0]:>6.1f}"
            )
    print(f"load average {load_before} -> {result['load_average_after']}")
    print(f"wrote {out / 'bench_vs_hf.json'} and {out / 'bench_vs_hf.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
