"""Measure prefill and decode latency on a GPU and write the profile table placement/ reads.

    python scripts/profile_models.py --model configs/models/llama-7b --out profiles/h100.json
    python scripts/profile_models.py --model configs/models/llama-7b --dry-run   # any machine

For each model architecture (a checkpoint folder or its config.json: only the architecture is
read, the weights are random of the real sizes), tensor-parallel degree and SM share: the
latency of a prefill job against the tokens in it, and of a decode step on a batch x context
grid, each the median of `--repeat` runs of `ModelRunner.execute` (inputs to the device, the
forward over the unified pool with the CUDA kernels and decode graphs, sampling, tokens back),
as the engine runs a job. The output is placement's `muxserve-profile/1` format
(placement/profile_table.py; docs/kernels.md describes it), validated before it is written.

SM shares below 1 run on a green context of that many SMs (muxserve/runner/sm_partition.py);
where torch has none the script refuses them. Tensor parallelism is not implemented in
muxserve yet (muxserve/models/sharding.py), so `--tp` accepts 1 only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muxserve.dtypes import DTYPE_BYTES
from muxserve.models.hf_config import HFModelConfig, load_hf_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # placement/ sits next to muxserve/, installed or not
    sys.path.append(str(ROOT))

from placement.profile_table import FORMAT, ProfileFile  # noqa: E402
from placement.specs import spec_from_config  # noqa: E402

DEFAULT_PREFILL_TOKENS = [128, 256, 512, 1024, 2048, 4096]
DEFAULT_BATCH = [1, 2, 4, 8, 16, 32, 64, 128]
DEFAULT_CONTEXT = [128, 256, 512, 1024, 2048]
HEADROOM = 0.85  # of the free memory the weights, activations and the pool may take


@dataclass(frozen=True)
class ModelPlan:
    """What will be measured for one architecture: its grids, pruned to fit the GPU."""

    path: str
    config: HFModelConfig
    arch_key: str
    prefill_tokens: list[int]
    batch: list[int]
    context: list[int]
    dropped_batch: list[int]  # batch sizes whose KV at the longest context would not fit
    pool_blocks: int

    def measurements(self, shares: int) -> int:
        return shares * (len(self.prefill_tokens) + len(self.batch) * len(self.context))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        action="append",
        required=True,
        help="checkpoint folder or config.json (repeat for several)",
    )
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--sm", type=float, nargs="+", default=[1.0], help="SM shares in (0, 1]")
    ap.add_argument("--prefill-tokens", type=int, nargs="+", default=DEFAULT_PREFILL_TOKENS)
    ap.add_argument(
        "--prefill-seq-len",
        type=int,
        default=512,
        help="a prefill job of N tokens is ceil(N / this) sequences",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=DEFAULT_BATCH)
    ap.add_argument("--context", type=int, nargs="+", default=DEFAULT_CONTEXT)
    ap.add_argument("--block-bytes", type=int, default=16 << 10)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="GiB to plan for (default: free GPU memory; 80 in a dry run)",
    )
    ap.add_argument("--gpu", default=None, help="GPU name to record (default: the device's)")
    ap.add_argument("--out", type=Path, default=None, help="profile table to write (JSON)")
    ap.add_argument("--dry-run", action="store_true", help="list the grid and exit (no GPU)")
    args = ap.parse_args(argv)
    problems = []
    if any(tp != 1 for tp in args.tp):
        problems.append(
            "--tp: tensor parallelism is not implemented in muxserve yet "
            "(muxserve/models/sharding.py); profile tp=1"
        )
    if any(not 0 < s <= 1 for s in args.sm):
        problems.append("--sm: shares must be in (0, 1]")
    for name in ("prefill_tokens", "batch", "context"):
        values = getattr(args, name)
        if any(v < 1 for v in values) or sorted(set(values)) != values:
            problems.append(f"--{name.replace('_', '-')}: positive and strictly increasing")
    if not args.dry_run and args.out is None:
        problems.append("--out is required (or --dry-run)")
    if problems:
        ap.error("; ".join(problems))
    return args


def plan_model(path: str, args: argparse.Namespace, memory_bytes: float) -> ModelPlan:
    """The grids for one architecture; batch sizes whose KV does not fit are dropped."""
    config = load_hf_config(path)
    spec = spec_from_config(Path(path).name, path, config, args.dtype)
    item = DTYPE_BYTES[args.dtype]
    tpb = args.block_bytes // (2 * config.head_dim * item)
    if tpb < 1:
        raise SystemExit(f"{path}: --block-bytes {args.block_bytes} holds no token")
    per_logical = config.num_layers * config.num_kv_heads

    def blocks(seqs: int, tokens: int) -> int:
        return seqs * math.ceil(tokens / tpb) * per_logical

    # what is left for the pool once the weights and a prefill's activations are in
    activations = (
        max(args.prefill_tokens) * (4 * config.hidden_size + 3 * config.intermediate_size) * item
        + max(args.batch) * config.vocab_size * 4
    )
    budget = memory_bytes * HEADROOM - spec.weight_bytes - activations
    prefill_seqs = math.ceil(max(args.prefill_tokens) / args.prefill_seq_len)
    prefill_blocks = blocks(prefill_seqs, min(max(args.prefill_tokens), args.prefill_seq_len))
    batch = list(args.batch)
    dropped = []
    while batch and blocks(batch[-1], max(args.context)) * args.block_bytes > budget:
        dropped.insert(0, batch.pop())
    if not batch:
        raise SystemExit(
            f"{path}: not even batch {args.batch[0]} x context {max(args.context)} fits in "
            f"{memory_bytes / 2**30:.0f} GiB after {spec.weight_bytes / 2**30:.1f} GiB of weights"
        )
    pool = max(prefill_blocks, blocks(batch[-1], max(args.context)))
    return ModelPlan(
        path,
        config,
        spec.arch_key,
        list(args.prefill_tokens),
        batch,
        list(args.context),
        dropped,
        pool,
    )


def describe(plans: list[ModelPlan], args: argparse.Namespace, memory_bytes: float) -> str:
    lines = [
        f"planning for {memory_bytes / 2**30:.0f} GiB, dtype {args.dtype}, "
        f"block {args.block_bytes} bytes, tp {args.tp}, SM shares {args.sm}"
    ]
    total = 0
    for p in plans:
        n = p.measurements(len(args.sm)) * len(args.tp)
        dropped = f"  (dropped, no room: {p.dropped_batch})" if p.dropped_batch else ""
        total += n
        lines += [
            f"{p.arch_key}  ({p.path})",
            f"  prefill tokens: {p.prefill_tokens}  (sequences of <= {args.prefill_seq_len})",
            f"  decode batch:   {p.batch}{dropped}",
            f"  decode context: {p.context}",
            f"  pool: {p.pool_blocks} blocks; {n} measurements",
        ]
    lines.append(f"{total} measurements of {args.repeat} runs each")
    return "\n".join(lines)


# ---- measuring (GPU) ---------------------------------------------------------------------
def measure(plan: ModelPlan, args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from muxserve.kv.block_pool import BlockPool
    from muxserve.kv.block_tables import BlockTables
    from muxserve.kv.layout import KVLayout
    from muxserve.models.registry import build_model
    from muxserve.runner.kv_pool import KVPool
    from muxserve.runner.model_runner import ModelRunner
    from muxserve.runner.sm_partition import make_partition
    from muxserve.sampling_params import SamplingParams
    from muxserve.scheduler.job import Job, Phase, SeqWork

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    c = plan.config
    with torch.device("meta"):
        model = build_model(c)
    model = model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.build_rope_cache(device)
    layout = KVLayout(
        c.num_layers, c.num_kv_heads, c.head_dim, DTYPE_BYTES[args.dtype], args.block_bytes
    )
    pool = KVPool(plan.pool_blocks, args.block_bytes, device)
    runner = ModelRunner(plan.arch_key, model, c, pool, layout, dtype)
    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    job_ids = iter(range(1 << 62))

    def tables_for(seqs: int, tokens: int) -> list[np.ndarray]:
        tables = BlockTables(BlockPool(plan.pool_blocks, {"m": plan.pool_blocks}), {"m": layout})
        for i in range(seqs):
            tables.cover("m", str(i), tokens)
        return [tables.table(str(i)) for i in range(seqs)]

    def timed(job: Job) -> float:
        times = []
        for i in range(args.warmup + args.repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = runner.execute(job)
            if res.error is not None:
                raise RuntimeError(res.error)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def prefill_latency(tokens: int) -> float:
        lens = [args.prefill_seq_len] * (tokens // args.prefill_seq_len)
        lens += [tokens % args.prefill_seq_len] if tokens % args.prefill_seq_len else []
        tables = tables_for(len(lens), max(lens))
        seqs = []
        for i, n in enumerate(lens):
            ids = tuple(rng.integers(0, c.vocab_size, n).tolist())
            seqs.append(SeqWork(str(i), ids, 0, tables[i], True, greedy, 0, 0))
        return timed(Job(next(job_ids), "m", Phase.PREFILL, tuple(seqs), 1.0))

    decode_tables = tables_for(plan.batch[-1], plan.context[-1])

    def decode_latency(batch: int, context: int) -> float:
        width = math.ceil(context / layout.tokens_per_block)
        seqs = []
        for i in range(batch):
            token = (int(rng.integers(0, c.vocab_size)),)
            table = decode_tables[i][:width]
            seqs.append(SeqWork(str(i), token, context - 1, table, True, greedy, 0, 0))
        return timed(Job(next(job_ids), "m", Phase.DECODE, tuple(seqs), 1.0))

    entries = []
    for share in args.sm:
        part = make_partition(device, share)
        if share < 1.0 and part.num_sms is None:
            raise SystemExit(f"SM share {share}: this torch/driver has no green contexts")
        with torch.cuda.stream(part.stream):
            prefill = [prefill_latency(n) for n in plan.prefill_tokens]
            print(f"  sm {share}: prefill {[f'{t * 1e3:.1f}' for t in prefill]} ms", flush=True)
            decode = [[decode_latency(b, ctx) for ctx in plan.context] for b in plan.batch]
            for b, row in zip(plan.batch, decode, strict=True):
                print(
                    f"  sm {share}: decode batch {b}: {[f'{t * 1e3:.2f}' for t in row]} ms",
                    flush=True,
                )
        common = {"model": plan.arch_key, "tp": 1, "sm": share}
        entries.append(
            {**common, "phase": "prefill", "tokens": plan.prefill_tokens, "latency_s": prefill}
        )
        entries.append(
            {
                **common,
                "phase": "decode",
                "batch": plan.batch,
                "context": plan.context,
                "latency_s": decode,
            }
        )
    return entries


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.dry_run:
        print(
            "profile_models: needs a CUDA GPU (torch.cuda.is_available() is False); "
            "--dry-run lists the grid it would measure",
            file=sys.stderr,
        )
        return 2
    if args.gpu_memory_gib is not None:
        memory = args.gpu_memory_gib * 2**30
    elif on_gpu:
        memory = float(torch.cuda.mem_get_info()[0])
    else:
        memory = 80.0 * 2**30
    plans = [plan_model(p, args, memory) for p in args.model]
    print(describe(plans, args, memory), flush=True)
    if args.dry_run:
        return 0
    gpu = args.gpu or torch.cuda.get_device_name()
    entries = []
    for plan in plans:
        print(f"measuring {plan.arch_key} on {gpu}", flush=True)
        entries += measure(plan, args)
        torch.cuda.empty_cache()
    table = {"format": FORMAT, "gpu": gpu, "entries": entries}
    ProfileFile.model_validate(table)  # what load_profile will accept
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
