"""Decode with the engine's weights in four kinds of CPU memory, against HF.

    python scripts/bench_weight_memory.py                 # MHA and GQA, 1 x 128
    python scripts/bench_weight_memory.py --kv-heads 8 --steps 10 --repeats 12
    python scripts/bench_weight_memory.py --batch 16 --sides aligned arena --kv-heads 4 \
        --hidden 1024 --intermediate 2816 --heads 16     # bench_vs_hf's 150M model, 16 x 128

Why the engine's batch-1 decode step was 1.02-1.03x HF transformers' (issue 11) when its code
does no more work: a batch-1 step reads every weight once, and how fast it walks them depends
on the memory behind them. One process holds HF's model (computing from the safetensors
file's mapped pages, as transformers loads it) and engines over the same checkpoint whose
weights differ only in where they live:

- `heap`: copied into torch's allocator (4 KiB pages where transparent huge pages are
  `madvise`-only): the loader before issue 11's fix;
- `mapped`: the safetensors file's own mapped pages, as HF computes from them;
- `aligned`: the arena with every parameter on a 64-byte boundary, the LM head too (the
  loader before `weight_arena.SKEW`: MKL's sgemm multiplies a batch of rows by an aligned
  wide matrix slower);
- `arena`: the loader now (`muxserve.models.weight_arena`), one mapping advised into huge pages,
  the LM head 32 bytes past a 64-byte boundary.

All sides (`--sides` picks the engines) prefill the same `--batch` prompts and decode greedily;
each round times one step of each, in an order that rotates every round, one torch thread.
Reported per side: the median step with its p10-p90 in wall time and in the thread's CPU time
(which the time slices other processes take do not inflate), and the medians of the paired
ratios side / HF (each against the HF step of its round) with their quartiles; also whether
all sides produced the same tokens, the huge pages the process held (AnonHugePages), and the
load average. JSON goes to `--out` (`weight_memory.json`, or `--name`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # this checkout's muxserve; bench_decode

from bench_decode import (  # noqa: E402
    EngineSide,
    HFSide,
    Point,
    prompts,
    quartiles,
    summary,
    timed,
    write_checkpoint,
)
from safetensors import safe_open  # noqa: E402

from muxserve.config import parse_config  # noqa: E402
from muxserve.engine import MuxEngine  # noqa: E402
from muxserve.models import weight_arena  # noqa: E402

SIDES = ("heap", "mapped", "aligned", "arena")


def to_heap(model: torch.nn.Module) -> None:
    """Every parameter copied into torch's allocator (the loader before the arena)."""
    for p in model.parameters():
        p.data = p.data.clone()


def to_mapped(model: torch.nn.Module, file: Path) -> None:
    """Every parameter replaced by the safetensors file's mapped tensor of the same name
    (float32 on disk and in the model: no cast, the same values)."""
    params = dict(model.named_parameters())
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if name in params:
                mapped = f.get_tensor(name)
                if not torch.equal(mapped, params[name]):
                    raise RuntimeError(f"{name}: the file's tensor differs from the loaded one")
                params[name].data = mapped


def anon_huge_kib() -> int | None:
    """AnonHugePages of this process in KiB (None where /proc does not tell)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def run(args: argparse.Namespace, kv_heads: int) -> dict[str, Any]:
    import transformers

    shape = argparse.Namespace(**vars(args), kv_heads=kv_heads)
    point = Point(args.batch, args.prompt)
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, shape)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        engines: dict[str, MuxEngine] = {}
        kv_bytes = 2 * args.layers * kv_heads * (args.hidden // args.heads) * 4
        steps = args.steps * args.repeats
        pool = point.batch * (point.prompt + steps + 24) * kv_bytes * 5 // 4 + (16 << 20)
        config = {
            "models": [{"name": "bench", "path": str(folder), "rate": 1.0}],
            "engine": {
                "kv_pool_bytes": pool,
                "device": "cpu",
                "prefill_token_budget": point.batch * point.prompt,  # one prefill job
                "max_batch_size": point.batch,
            },
        }
        skew = weight_arena.SKEW
        try:
            for name in args.sides:
                weight_arena.SKEW = 0 if name == "aligned" else skew
                try:
                    engines[name] = MuxEngine(parse_config(config))
                finally:
                    weight_arena.SKEW = skew
            models = {n: e.executor.runners["bench"].model for n, e in engines.items()}  # type: ignore[attr-defined]
            if "heap" in models:
                to_heap(models["heap"])
            if "mapped" in models:
                to_mapped(models["mapped"], folder / "model.safetensors")
            batch = prompts(point, seed=1)
            torch.set_num_threads(os.cpu_count() or 1)  # the prefills are not timed
            sides: dict[str, Any] = {"hf": HFSide(hf_model, batch)}
            for name, engine in engines.items():
                sides[name] = EngineSide(engine, batch, max_tokens=steps + 8)
            torch.set_num_threads(1)
            names = list(sides)
            ms: dict[str, list[float]] = {n: [] for n in names}
            cpu_ms: dict[str, list[float]] = {n: [] for n in names}
            for i in range(steps):
                order = names[i % len(names) :] + names[: i % len(names)]
                for n in order:
                    start = time.thread_time()
                    ms[n].append(timed(sides[n].step) * 1e3)
                    cpu_ms[n].append((time.thread_time() - start) * 1e3)
                if (i + 1) % args.steps == 0:
                    last = ", ".join(
                        f"{n} {statistics.median(ms[n][-args.steps :]):.2f}" for n in names
                    )
                    print(
                        f"  kv_heads {kv_heads}, round {i + 1}/{steps}: {last} ms", file=sys.stderr
                    )
            tokens = {n: sides[n].tokens if n == "hf" else sides[n].tokens() for n in names}
            huge = anon_huge_kib()
            for n in engines:
                sides[n].finish()
        finally:
            for e in engines.values():
                e.shutdown()
    out: dict[str, Any] = {"kv_heads": kv_heads, "batch": point.batch, "prompt": point.prompt}
    out["anon_huge_pages_kib"] = huge
    out["same_tokens"] = all(tokens[n] == tokens["hf"] for n in names)
    for n in names:
        out[n] = {"ms": summary(ms[n]), "cpu_ms": summary(cpu_ms[n])}
        for key, values in (("vs_hf", ms), ("cpu_vs_hf", cpu_ms)):
            ratios = [a / b for a, b in zip(values[n], values["hf"], strict=True)]
            q1, q3 = quartiles(ratios)
            out[n][key] = {"median": statistics.median(ratios), "q1": q1, "q3": q3}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument(
        "--sides", nargs="+", choices=SIDES, default=list(SIDES), help="the engines (all four)"
    )
    p.add_argument("--steps", type=int, default=10, help="steps per progress line")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/speed")
    p.add_argument("--name", default="weight_memory.json", help="the JSON file's name")
    args = p.parse_args(argv)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    shape = {k: v for k, v in vars(args).items() if k not in ("kv_heads", "out", "name")}
    rows = [run(argparse.Namespace(**shape), kv) for kv in args.kv_heads]
    result = {
        "command": " ".join(["python", "scripts/bench_weight_memory.py", *(argv or sys.argv[1:])]),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "model": shape,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "runs": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.name).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"kv_heads {row['kv_heads']} (same tokens: {row['same_tokens']}, "
              f"AnonHugePages {row['anon_huge_pages_kib']} KiB)")  # fmt: skip
        for n in ("hf", *args.sides):
            m, r, c, rc = (row[n][k] for k in ("ms", "vs_hf", "cpu_ms", "cpu_vs_hf"))
            print(
                f"  {n:>7}: {m['median']:6.2f} ms (p10-p90 {m['p10']:.2f}-{m['p90']:.2f}), "
                f"/ HF {r['median']:.3f} (IQR {r['q1']:.3f}-{r['q3']:.3f}); thread CPU "
                f"{c['median']:6.2f} ms, / HF {rc['median']:.3f} "
                f"(IQR {rc['q1']:.3f}-{rc['q3']:.3f})"
            )
    print(f"load average {load_before} -> {result['load_average_after']}")
    return 0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
