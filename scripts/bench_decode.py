"""One decode step of MuxEngine against Hugging Face transformers (DynamicCache), same model.

    python scripts/bench_decode.py                       # the points of issue 11's table
    python scripts/bench_decode.py --points 1x128 16x512 32x512 --kv-heads 2 --steps 8

A seeded random Llama (hidden 512, 8 layers by default) is written once as a checkpoint and
loaded by both sides in float32, one torch thread in this one process. For each point
(batch x prompt tokens) both sides prefill the same prompts, then decode greedily step by step:
one HF forward over its DynamicCache plus an argmax, against one `MuxEngine.step()` (the
scheduler, the runner's forward over the pool, sampling, detokenization). The two sides
alternate step by step, the order flipping every step, so background load hits both alike;
`--repeats` blocks of `--steps` steps each. Also timed, interleaved the same way: one pass
reading every weight of the engine's model (`sum` over each parameter), the floor a batch-1
decode step tends to.

transformers maps the safetensors file and computes from those pages (file-backed, which the
kernel may give large folios), the engine copies its weights to the heap (4 KiB pages where
transparent huge pages are off or madvise-only): the same matmuls then differ by a few percent
at batch 1, whatever the code. `--hf-weights heap` copies HF's weights to the heap too, so the
two compare code with code.

With `--e2e N`, also end to end: N prompts of mixed lengths (`--e2e-prompts`), `--e2e-tokens`
new tokens each, greedy: transformers' `generate` over the left-padded batch against
`MuxEngine.generate` (continuous batching, no padding), alternating, `--e2e-repeats` times.

Reported per point: the median step (ms) with its p10-p90 over all steps, the median of the
paired ratios engine / HF (each engine step against the HF step next to it) with the min and
max of the per-repeat medians, and the load average before and after. `results.json` goes to
`--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from muxserve.config import parse_config
from muxserve.demo import BOS, EOS, PAD, SPECIAL_TOKENS, ensure_demo_models, make_weights
from muxserve.engine import MuxEngine
from muxserve.sampling_params import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPT_VOCAB = 1000  # prompt ids are drawn below this (the demo tokenizer's vocabulary)


@dataclass(frozen=True)
class Point:
    batch: int
    prompt: int

    @classmethod
    def parse(cls, text: str) -> Point:
        b, p = text.lower().split("x")
        return cls(int(b), int(p))

    def __str__(self) -> str:
        return f"{self.batch}x{self.prompt}"


def write_checkpoint(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A seeded random Llama in the Hugging Face layout, with the demo tokenizer's files."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": args.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    save_file(make_weights(config, seed=11), str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    demo = ensure_demo_models()["llama-demo"]
    for name in TOKENIZER_FILES:
        shutil.copy(demo / name, folder / name)
    return config


def prompts(point: Point, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, PROMPT_VOCAB, (point.batch, point.prompt), generator=gen)
    return ids.tolist()


class HFSide:
    """transformers' model over a DynamicCache, decoding greedily one step at a time."""

    def __init__(
        self, model: torch.nn.Module, batch: list[list[int]], chunk_tokens: int | None = None
    ) -> None:
        """Prefill `batch` (rows of one length), `chunk_tokens` tokens of the whole batch per
        forward at most (one forward by default): logits of the last position only."""
        self.model = model
        ids = torch.tensor(batch)  # (B, T)
        step = ids.shape[1] if chunk_tokens is None else max(1, chunk_tokens // ids.shape[0])
        cache = None
        with torch.inference_mode():
            for start in range(0, ids.shape[1], step):
                out = model(
                    ids[:, start : start + step],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = out.past_key_values
        self.cache = cache
        self.next = out.logits[:, -1].argmax(-1)  # (B,)
        self.tokens: list[list[int]] = [[t] for t in self.next.tolist()]

    @torch.inference_mode()
    def step(self) -> None:
        out = self.model(self.next[:, None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next = out.logits[:, -1].argmax(-1)  # (B,)
        for row, t in zip(self.tokens, self.next.tolist(), strict=True):
            row.append(t)


class EngineSide:
    """MuxEngine with the batch prefilled and decoding: each `step()` is one decode job."""

    def __init__(self, engine: MuxEngine, batch: list[list[int]], max_tokens: int) -> None:
        self.engine = engine
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.ids = [engine.add_request("bench", p, params) for p in batch]
        # prefill until every request has its first token (one job: the budget holds them)
        while any(not self._request(r).output_token_ids for r in self.ids):
            engine.step()
        if any(len(self._request(r).output_token_ids) != 1 for r in self.ids):
            raise RuntimeError("the batch was not prefilled at once: rows differ in length")

    def _request(self, rid: str) -> Any:
        req = self.engine.scheduler.get(rid)
        assert req is not None, rid
        return req

    def step(self) -> None:
        before = sum(len(self._request(r).output_token_ids) for r in self.ids)
        self.engine.step()
        after = sum(len(self._request(r).output_token_ids) for r in self.ids)
        if after - before != len(self.ids):  # one decode job of the whole batch, nothing else
            raise RuntimeError(f"an engine step gave {after - before} tokens, not {len(self.ids)}")

    def tokens(self) -> list[list[int]]:
        return [list(self._request(r).output_token_ids) for r in self.ids]

    def finish(self) -> None:
        for rid in self.ids:
            self.engine.abort(rid)


def bench_engine(
    folder: Path, pool_bytes: int, prefill_budget: int, max_batch: int, block_bytes: int | None
) -> MuxEngine:
    """The one-model CPU engine the decode benchmarks time: `folder`'s checkpoint, named
    "bench"; `block_bytes` None keeps the engine's default block size."""
    engine: dict[str, Any] = {"kv_pool_bytes": pool_bytes, "device": "cpu"}
    engine |= {"prefill_token_budget": prefill_budget, "max_batch_size": max_batch}
    if block_bytes is not None:
        engine["block_bytes"] = block_bytes
    models = [{"name": "bench", "path": str(folder), "rate": 1.0}]
    return MuxEngine(parse_config({"models": models, "engine": engine}))


def read_weights(model: torch.nn.Module) -> None:
    """One pass over every weight: the memory traffic a batch-1 decode step cannot avoid."""
    with torch.inference_mode():
        for p in model.parameters():
            p.sum()


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, float]:
    """Median with p10 and p90 (ms for times), interpolated within the values."""
    if len(values) < 2:
        return {"median": values[0], "p10": values[0], "p90": values[0]}
    qs = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": qs[0], "p90": qs[-1]}


def ratio_stats(values: list[float]) -> dict[str, float]:
    """Median and quartiles of paired ratios."""
    q1, q3 = quartiles(values)
    return {"median": statistics.median(values), "q1": q1, "q3": q3}


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles, interpolated within the values (one value: it twice)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def bench_point(
    point: Point,
    hf_model: torch.nn.Module,
    engine: MuxEngine,
    ours: torch.nn.Module,
    args: argparse.Namespace,
    prefill_threads: int | None = None,
    hf_chunk_tokens: int | None = None,
) -> dict[str, Any]:
    """Both sides prefill the point's prompts (with `prefill_threads` torch threads, default
    the timed count; HF `hf_chunk_tokens` at a time), then `args.repeats` x `args.steps`
    decode steps, interleaved and timed with `args.threads` threads."""
    batch = prompts(point, seed=point.batch * 100_003 + point.prompt)
    torch.set_num_threads(prefill_threads or args.threads)
    try:
        hf = HFSide(hf_model, batch, hf_chunk_tokens)
        side = EngineSide(engine, batch, max_tokens=args.steps * args.repeats + 8)
    finally:
        torch.set_num_threads(args.threads)
    hf_ms: list[float] = []
    ours_ms: list[float] = []
    weights_ms: list[float] = []
    weights_cpu_ms: list[float] = []
    ratios: list[list[float]] = []
    cpu_ms: dict[Any, list[float]] = {hf.step: [], side.step: []}  # the thread's CPU time
    for rep in range(args.repeats):
        rep_ratios = []
        for step in range(args.steps):
            order = (hf.step, side.step) if (rep + step) % 2 == 0 else (side.step, hf.step)
            t = {}
            for fn in order:
                start = time.thread_time()
                t[fn] = timed(fn)
                cpu_ms[fn].append((time.thread_time() - start) * 1e3)
            start = time.thread_time()
            weights_ms.append(timed(lambda: read_weights(ours)) * 1e3)
            weights_cpu_ms.append((time.thread_time() - start) * 1e3)
            hf_ms.append(t[hf.step] * 1e3)
            ours_ms.append(t[side.step] * 1e3)
            rep_ratios.append(t[side.step] / t[hf.step])
        ratios.append(rep_ratios)
        print(
            f"  {point} rep {rep}: hf {statistics.median(hf_ms[-args.steps :]):.1f} ms, "
            f"engine {statistics.median(ours_ms[-args.steps :]):.1f} ms",
            file=sys.stderr,
        )
    # greedy on the same weights: rows whose tokens agree (a check, not a timing; random
    # weights leave near-ties that float rounding may flip)
    same = sum(a == b for a, b in zip(hf.tokens, side.tokens(), strict=True))
    side.finish()
    flat = [r for rep in ratios for r in rep]
    per_rep = [statistics.median(rep) for rep in ratios]
    cpu_ratios = [e / h for e, h in zip(cpu_ms[side.step], cpu_ms[hf.step], strict=True)]
    return {
        "point": str(point),
        "batch": point.batch,
        "prompt": point.prompt,
        "steps": len(flat),
        "hf_ms": summary(hf_ms),
        "engine_ms": summary(ours_ms),
        "weights_read_ms": summary(weights_ms),
        "ratio": {**ratio_stats(flat), "rep_min": min(per_rep), "rep_max": max(per_rep)},
        # the same steps in the timing thread's CPU time: what the time slices other processes
        # take do not inflate (their contention for caches and memory still does)
        "hf_cpu_ms": summary(cpu_ms[hf.step]),
        "engine_cpu_ms": summary(cpu_ms[side.step]),
        "cpu_ratio": ratio_stats(cpu_ratios),
        "engine_vs_weights_read": statistics.median(ours_ms) / statistics.median(weights_ms),
        # the same in thread CPU time (the read too), and per step with its quartiles: what
        # other processes' time slices do not inflate
        "weights_read_cpu_ms": summary(weights_cpu_ms),
        "engine_vs_weights_read_cpu": ratio_stats(
            [e / w for e, w in zip(cpu_ms[side.step], weights_cpu_ms, strict=True)]
        ),
        "rows_same_tokens": same,
    }


def bench_e2e(hf_model: torch.nn.Module, engine: MuxEngine, args: argparse.Namespace) -> dict:
    """`--e2e` prompts of mixed lengths, `--e2e-tokens` new tokens each, greedy: transformers'
    `generate` over the left-padded batch against `MuxEngine.generate`, alternating."""
    gen = torch.Generator().manual_seed(7)
    lo, hi = args.e2e_prompts
    lens = torch.randint(lo, hi + 1, (args.e2e,), generator=gen).tolist()
    batch = [torch.randint(7, PROMPT_VOCAB, (n,), generator=gen).tolist() for n in lens]
    pad = SPECIAL_TOKENS.index(PAD)
    ids = torch.full((len(batch), max(lens)), pad)  # (B, longest), left-padded
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, ids.shape[1] - len(prompt) :] = torch.tensor(prompt)
        mask[row, ids.shape[1] - len(prompt) :] = 1
    n = args.e2e_tokens
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def hf_run() -> None:
        with torch.inference_mode():
            hf_model.generate(  # type: ignore[operator]
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,  # every row n tokens, as the engine's ignore_eos
                do_sample=False,
                pad_token_id=pad,
            )

    def engine_run() -> None:
        engine.generate(batch, params, "bench")

    hf_s: list[float] = []
    engine_s: list[float] = []
    for rep in range(args.e2e_repeats):
        order = (hf_run, engine_run) if rep % 2 == 0 else (engine_run, hf_run)
        t = {fn: timed(fn) for fn in order}
        hf_s.append(t[hf_run])
        engine_s.append(t[engine_run])
        print(f"  e2e rep {rep}: hf {hf_s[-1]:.2f} s, engine {engine_s[-1]:.2f} s", file=sys.stderr)
    speedups = [h / e for h, e in zip(hf_s, engine_s, strict=True)]
    tokens = len(batch) * n
    return {
        "batch": len(batch),
        "prompt_tokens": {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)},
        "new_tokens": n,
        "hf_s": summary(hf_s),
        "engine_s": summary(engine_s),
        "hf_tokens_per_s": tokens / statistics.median(hf_s),
        "engine_tokens_per_s": tokens / statistics.median(engine_s),
        "engine_over_hf_tokens_per_s": {
            "median": statistics.median(speedups),
            "min": min(speedups),
            "max": max(speedups),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--points", nargs="+", type=Point.parse, default=[Point(1, 128), Point(16, 512)])
    p.add_argument("--steps", type=int, default=8, help="decode steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--block-bytes", type=int, default=16 << 10, help="the engine's block size")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--attn", default="sdpa", help="transformers' attn_implementation")
    p.add_argument(
        "--hf-weights",
        choices=("mapped", "heap"),
        default="mapped",
        help="HF's weights as transformers loads them (the file's mapped pages), or copied "
        "to the heap as the engine's are",
    )
    p.add_argument("--e2e", type=int, default=0, help="end to end too, this many prompts")
    p.add_argument(
        "--e2e-prompts", type=int, nargs=2, default=[32, 512], metavar=("LO", "HI"),
        help="their lengths, uniform",
    )  # fmt: skip
    p.add_argument("--e2e-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--e2e-repeats", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/decode")
    args = p.parse_args(argv)
    if args.vocab <= PROMPT_VOCAB:
        p.error(
            f"--vocab {args.vocab}: prompt ids are drawn below {PROMPT_VOCAB}, so it must be larger"
        )
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values' rename
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        folder = Path(tmp)
        config = write_checkpoint(folder, args)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=args.attn
        ).eval()
        if args.hf_weights == "heap":
            with torch.no_grad():
                for w in hf_model.parameters():
                    w.data = w.data.clone()
        params = sum(x.numel() for x in hf_model.parameters())
        longest = max(pt.prompt for pt in args.points) + args.steps * args.repeats + 16
        tokens = sum(pt.batch for pt in args.points) * longest
        tokens += args.e2e * (args.e2e_prompts[1] + args.e2e_tokens + 16)
        kv_bytes = 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * 4 * tokens
        # one prefill job for the whole batch: every row starts decoding at the same length,
        # as HF's do
        e2e_budget = args.e2e * args.e2e_prompts[1]
        budget = max([pt.batch * pt.prompt for pt in args.points] + [e2e_budget])
        batch = max([pt.batch for pt in args.points] + [args.e2e])
        engine = bench_engine(folder, 2 * kv_bytes + (64 << 20), budget, batch, args.block_bytes)
        try:
            ours = engine.executor.runners["bench"].model  # type: ignore[attr-defined]
            for point in args.points:
                rows.append(bench_point(point, hf_model, engine, ours, args))
            e2e = bench_e2e(hf_model, engine, args) if args.e2e else None
        finally:
            engine.shutdown()
    result = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": args.threads,
        "hf_attn_implementation": args.attn,
        "hf_weights": args.hf_weights,
        "model": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
        | {"heads": args.heads, "kv_heads": args.kv_heads, "parameters": params},
        "block_bytes": args.block_bytes,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "points": rows,
        "e2e": e2e,
    }
    heads = ("point", "hf ms", "(p10-p90)", "engine ms", "(p10-p90)", "ratio", "(rep min-max)")
    print("".join(f"{h:>14}" for h in heads) + f"{'weights ms':>12}{'same':>6}")
    for r in rows:
        h, e, q = r["hf_ms"], r["engine_ms"], r["ratio"]
        cells = (
            r["point"],
            f"{h['median']:.1f}",
            f"{h['p10']:.1f}-{h['p90']:.1f}",
            f"{e['median']:.1f}",
            f"{e['p10']:.1f}-{e['p90']:.1f}",
            f"{q['median']:.2f}x",
            f"{q['rep_min']:.2f}-{q['rep_max']:.2f}",
        )
        weights = f"{r['weights_read_ms']['median']:.1f}"
        print("".join(f"{c:>14}" for c in cells) + f"{weights:>12}{r['rows_same_tokens']:>6}")
    if e2e is not None:
        x = e2e["engine_over_hf_tokens_per_s"]
        print(
            f"end to end, {e2e['batch']} prompts of {args.e2e_prompts[0]}-{args.e2e_prompts[1]} "
            f"tokens, {e2e['new_tokens']} new each: HF {e2e['hf_tokens_per_s']:.0f} tok/s, "
            f"engine {e2e['engine_tokens_per_s']:.0f} tok/s, engine / HF {x['median']:.2f}x "
            f"(repeats {x['min']:.2f}-{x['max']:.2f})"
        )
    print(f"load average {load_before} -> {result['load_average_after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
