"""Make a profile table (JSON) by timing a model's layers on this machine's device.

    python -m placement.profiler --models M.yaml --out table.json [--sm 0.5] [--device cuda]

Times one decoder layer built from the model's `config.json` (random weights: latency does
not depend on their values) — prefill over a range of token counts, decode over a batch ×
context grid — and scales by the layer count, plus the LM head. SM shares are not set here:
run under MPS with `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50` and pass `--sm 0.5`, once per share,
and merge with `--merge`. Tensor-parallel entries (tp > 1) need a multi-GPU run and are not
made by this script; the analytic model covers them. Imports torch only when run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from placement.profile_table import FORMAT
from placement.specs import PlannerModel, load_models

TOKENS = (128, 256, 512, 1024, 2048)
BATCHES = (1, 8, 32, 128)
CONTEXTS = (128, 512, 1024)


def _layer(spec: PlannerModel, device: str) -> tuple[Any, Any]:
    """A Llama decoder layer's weights (q, k, v, o, gate, up, down) and the LM head."""
    import torch

    c, dt = spec.config, getattr(torch, spec.dtype)

    def w(rows: int, cols: int) -> Any:
        return torch.randn(rows, cols, device=device, dtype=dt) * 0.02

    h = c.hidden_size
    weights = {
        "qkv": w(c.q_size + 2 * c.kv_size, h),
        "o": w(h, c.q_size),
        "gate_up": w(2 * c.intermediate_size, h),
        "down": w(h, c.intermediate_size),
    }
    return weights, w(c.vocab_size, h)


def _forward(spec: PlannerModel, weights: dict, x: Any, kv: Any | None, causal: bool) -> Any:
    """One layer: fused projections, attention over (new + cached) keys, SwiGLU MLP."""
    import torch
    import torch.nn.functional as F

    c = spec.config
    b, t, _ = x.shape
    qkv = x @ weights["qkv"].T
    q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    q = q.view(b, t, c.num_heads, c.head_dim).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
    v = v.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
    if kv is not None:
        k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
    rep = c.num_heads // c.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    x = x + a.transpose(1, 2).reshape(b, t, c.q_size) @ weights["o"].T
    g, u = (x @ weights["gate_up"].T).chunk(2, dim=-1)
    return x + (F.silu(g) * u) @ weights["down"].T


def _time(fn: Any, device: str, repeat: int) -> float:
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def profile_model(
    spec: PlannerModel,
    device: str,
    sm: float,
    tokens: tuple[int, ...] = TOKENS,
    batches: tuple[int, ...] = BATCHES,
    contexts: tuple[int, ...] = CONTEXTS,
    repeat: int = 3,
) -> list[dict]:
    """Prefill and decode entries of one model at tensor parallelism 1."""
    import torch

    c, dt = spec.config, getattr(torch, spec.dtype)
    weights, head = _layer(spec, device)
    layers = c.num_layers
    with torch.inference_mode():
        prefill = []
        for n in tokens:
            x = torch.randn(1, n, c.hidden_size, device=device, dtype=dt)
            t = _time(lambda x=x: _forward(spec, weights, x, None, True), device, repeat)
            t_head = _time(lambda x=x: x[:, -1] @ head.T, device, repeat)
            prefill.append(layers * t + t_head)
        grid = []
        for b in batches:
            row = []
            for ctx in contexts:
                x = torch.randn(b, 1, c.hidden_size, device=device, dtype=dt)
                cache = torch.randn(2, b, c.num_kv_heads, ctx, c.head_dim, device=device, dtype=dt)
                t = _time(lambda x=x, kv=cache: _forward(spec, weights, x, kv, False), device,
                          repeat)  # fmt: skip
                t_head = _time(lambda x=x: x[:, -1] @ head.T, device, repeat)
                row.append(layers * t + t_head)
            grid.append(row)
    base = {"model": spec.arch_key, "tp": 1, "sm": sm}
    return [
        {**base, "phase": "prefill", "tokens": list(tokens), "latency_s": prefill},
        {**base, "phase": "decode", "batch": list(batches), "context": list(contexts),
         "latency_s": grid},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m placement.profiler", description=__doc__)
    ap.add_argument("--models", required=True, help="models file (YAML)")
    ap.add_argument("--out", required=True, type=Path, help="profile table to write (JSON)")
    ap.add_argument("--sm", type=float, default=1.0, help="SM share this run has (MPS)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu", default="unknown", help="GPU type, recorded in the table")
    ap.add_argument("--merge", action="store_true", help="add to an existing table")
    args = ap.parse_args(argv)
    table: dict = {"format": FORMAT, "gpu": args.gpu, "entries": []}
    if args.merge and args.out.exists():
        table = json.loads(args.out.read_text())
    done: set[str] = set()
    for spec in load_models(args.models).specs:
        if spec.arch_key in done:  # models sharing an architecture share entries
            continue
        done.add(spec.arch_key)
        table["entries"] += profile_model(spec, args.device, args.sm)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
