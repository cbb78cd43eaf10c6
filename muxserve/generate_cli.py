"""`muxserve generate`: run prompts through the engine offline and print the completions."""

from __future__ import annotations

import argparse
import json
import sys
import time

from muxserve.sampling_params import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="serving config (YAML); default: the demo models")
    p.add_argument(
        "--model", help="the one model to load and run (default: every model of the config)"
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")


def run(args: argparse.Namespace) -> int:
    from muxserve.config import load_config
    from muxserve.demo import default_config
    from muxserve.engine import MuxEngine
    from muxserve.errors import UnknownModelError

    config = load_config(args.config) if args.config else default_config()
    names = [m.name for m in config.models]
    if args.model is not None:  # checked before anything loads; only that model is loaded
        if args.model not in names:
            raise UnknownModelError(args.model, names)
        only = [m for m in config.models if m.name == args.model]
        config = config.model_copy(update={"models": only, "meshes": None})
    else:
        config = config.model_copy(update={"meshes": None})  # one engine, offline
    params = SamplingParams.checked(  # before anything loads
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    engine = MuxEngine.from_config(config, progress=True)
    models = list(engine.models)
    prompts = args.prompt or ["The quick brown fox", "Once upon a time"]
    pairs = [(m, p) for m in models for p in prompts]
    start = time.perf_counter()
    outs = engine.generate([p for _, p in pairs], params, [m for m, _ in pairs])
    elapsed = time.perf_counter() - start
    for (m, p), c in zip(pairs, outs, strict=True):
        if args.json:
            print(
                json.dumps(
                    {"model": m, "prompt": p, "text": c.text, "finish_reason": c.finish_reason}
                )
            )
        else:
            print(f"[{m}] {p!r} -> {c.text!r} ({c.finish_reason})")
    tokens = sum(len(c.token_ids) for c in outs)
    print(f"{len(outs)} completions, {tokens} tokens in {elapsed:.2f}s", file=sys.stderr)
    engine.shutdown()
    return 0
