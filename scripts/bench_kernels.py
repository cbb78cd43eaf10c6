"""Kernel benchmark on a GPU: decode attention and write_kv against the copy bandwidth.

    python scripts/bench_kernels.py [--out benchmarks/results/kernels-h100.json]

1. Device-to-device copy bandwidth of a 1 GiB buffer ((read + written bytes) / time): the
   yardstick. 2. Paged decode attention over shuffled 16 KiB blocks for a grid of (batch,
   context, heads / kv heads, head size, dtype): GB/s of K/V read and the fraction of the copy
   bandwidth, with the production split plan and with each split count. 3. write_kv of a
   prefill chunk. Needs a CUDA GPU; numbers are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from muxserve.cuda_timing import copy_bandwidth, cuda_time
from muxserve.kv.layout import KVLayout
from muxserve.runner.attention import BatchLayout
from muxserve.runner.kernels import ops
from muxserve.runner.kv_pool import KVPool

DECODE_GRID = [  # batch, context, heads, kv_heads, head_dim
    (64, 2048, 32, 32, 128),  # the acceptance point (Llama-7B)
    (1, 2048, 32, 32, 128),
    (8, 4096, 32, 8, 128),  # Llama-3-8B
    (32, 1024, 32, 8, 128),
    (256, 512, 32, 32, 128),
    (16, 8192, 64, 8, 128),
    (64, 2048, 32, 32, 64),
    (64, 2048, 32, 8, 80),
    (64, 2048, 16, 16, 256),
]


def decode_setup(
    batch: int,
    ctx: int,
    heads: int,
    kv_heads: int,
    hd: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, BatchLayout, torch.Tensor]:
    item = torch.empty((), dtype=dtype).element_size()
    layout = KVLayout(1, kv_heads, hd, item, 16 << 10)
    nlb = math.ceil(ctx / layout.tokens_per_block)
    num_blocks = batch * nlb * kv_heads
    cache = KVPool(num_blocks, layout.block_bytes, device).view(layout, dtype)
    cache.normal_()
    ids = torch.randperm(num_blocks, device=device).view(batch, nlb, 1, kv_heads)
    ctx_lens = torch.full((batch,), ctx, device=device)
    layout_ = BatchLayout(
        seq_of_token=torch.arange(batch, device=device),
        pos_of_token=ctx_lens - 1,
        row_of_token=torch.zeros_like(ctx_lens),
        q_lens=torch.ones_like(ctx_lens),
        ctx_lens=ctx_lens,
        block_tables=ids,
    )
    q = torch.randn(batch, heads, hd, device=device, dtype=dtype)
    return cache, layout_, q


def decode_point(
    kernels: Any,
    point: tuple[int, int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    bw: float,
    repeat: int,
) -> dict[str, Any]:
    batch, ctx, heads, kv_heads, hd = point
    cache, layout, q = decode_setup(batch, ctx, heads, kv_heads, hd, dtype, device)
    nbytes = batch * ctx * kv_heads * hd * 2 * q.element_size() + 2 * q.nbytes
    t = cuda_time(lambda: ops.decode_attention(q, cache, layout, 0, None, ctx), repeat)
    out = torch.empty_like(q)
    stream = torch.cuda.current_stream().cuda_stream
    by_splits = {}
    for n in (1, 2, 4, 8, 16):
        if n > 1 and ctx / n < 128:
            continue
        floats = kernels.decode_workspace_floats(batch, heads, hd, n)
        ws = torch.empty(max(1, floats), device=device) if n > 1 else None

        def launch(n: int = n, ws: torch.Tensor | None = ws) -> None:
            kernels.decode_attention(
                out,
                q,
                cache,
                layout.block_tables,
                layout.ctx_lens,
                0,
                0,
                hd**-0.5,
                n,
                math.ceil(ctx / n),
                ws,
                stream,
            )

        by_splits[n] = round(nbytes / cuda_time(launch, repeat) / bw, 3)
    plan = ops.split_plan(batch, kv_heads, heads // kv_heads, ctx, None, ops.num_sms(device))
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "context": ctx,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": hd,
        "plan": plan,
        "us": t * 1e6,
        "gb_per_s": nbytes / t / 1e9,
        "fraction": nbytes / t / bw,
        "fraction_by_splits": by_splits,
    }


def write_point(
    tokens: int, kv_heads: int, hd: int, device: torch.device, bw: float, repeat: int
) -> dict[str, Any]:
    dtype = torch.bfloat16
    layout = KVLayout(1, kv_heads, hd, 2, 16 << 10)
    nlb = math.ceil(tokens / layout.tokens_per_block)
    cache = KVPool(nlb * kv_heads, layout.block_bytes, device).view(layout, dtype)
    ids = torch.randperm(nlb * kv_heads, device=device).view(1, nlb, 1, kv_heads)
    batch = BatchLayout(
        seq_of_token=torch.zeros(tokens, dtype=torch.int64, device=device),
        pos_of_token=torch.arange(tokens, device=device),
        row_of_token=torch.arange(tokens, device=device),
        q_lens=torch.tensor([tokens], device=device),
        ctx_lens=torch.tensor([tokens], device=device),
        block_tables=ids,
    )
    k, v = torch.randn(2, tokens, kv_heads, hd, device=device, dtype=dtype)
    t = cuda_time(lambda: ops.write_kv(cache, k, v, batch, 0), repeat)
    nbytes = 2 * (k.nbytes + v.nbytes)  # read and written
    return {
        "tokens": tokens,
        "kv_heads": kv_heads,
        "head_dim": hd,
        "us": t * 1e6,
        "fraction": nbytes / t / bw,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"]
    )
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    os.environ[ops.KERNELS_ENV] = "on"  # a failed build is an error here, not a fallback
    device = torch.device("cuda", torch.cuda.current_device())
    bw = copy_bandwidth(device, repeat=args.repeat)
    gpu = torch.cuda.get_device_name(device)
    print(f"{gpu}: device-to-device copy {bw / 1e9:.0f} GB/s", flush=True)
    kernels = ops.kernels_for(device)
    decode = []
    for dtype_name in args.dtypes:
        for point in DECODE_GRID:
            row = decode_point(kernels, point, getattr(torch, dtype_name), device, bw, args.repeat)
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            decode.append(row)
    write = []
    for tokens, kv_heads, hd in ((2048, 32, 128), (2048, 8, 128), (64, 32, 128)):
        write.append(write_point(tokens, kv_heads, hd, device, bw, args.repeat))
        print(json.dumps(write[-1]), flush=True)
    result = {
        "gpu": gpu,
        "copy_gb_per_s": bw / 1e9,
        "torch": torch.__version__,
        "decode": decode,
        "write_kv": write,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
