"""Generate a multi-model workload trace (JSONL) for `muxserve bench`.

    python scripts/gen_workload.py --models llama-demo qwen-demo mistral-demo \\
        --rate 6 --duration 60 --alpha 1.0 --arrival gamma --cv 2 --ramp staggered \\
        --prompt-len chat:48:256 --output-len uniform:16:64 \\
        --tokenizer ~/.cache/muxserve/demo-models/llama-demo --seed 0 --out trace.jsonl

Model i's mean rate is proportional to (i + 1) ** -alpha; arrivals are a gamma renewal
process with the given coefficient of variation (1 with --arrival poisson); --ramp staggered
makes each model's rate rise and fall in turn. --popularity shifting rotates the power law's
ranks every phase (--shift-phases over the duration, --shift-step ranks each: which models
are hot changes over time); --popularity longtail gives a Zipf law (--alpha) over a seeded
shuffle of the models, most of them nearly idle. --copies K lists each model K times under
the names NAME-0 .. NAME-(K-1) (serve them as copies of one checkpoint). Lengths: fixed:N,
uniform:LO:HI, or chat:MEAN[:MAX] (log-normal, long-tailed). The same options and seed give
the same file.

From a conversation dump you downloaded (nothing is fetched), ShareGPT's JSON or
LMSYS-Chat-1M's JSON Lines, one request per conversation (first user turn, reply length):

    python scripts/gen_workload.py --from-trace lmsys-chat-1m.jsonl --trace-limit 5000 \
        --models llama-demo qwen-demo mistral-demo --rate 6 --cv 1 \
        --tokenizer ~/.cache/muxserve/demo-models/llama-demo --max-total-len 2048 --out trace.jsonl

There --rate, --arrival/--cv, --alpha (ShareGPT, whose records name no model), --seed,
--tokenizer and --max-total-len apply; the length and ramp options do not.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from muxserve.bench.trace import import_conversations, write_trace
from muxserve.bench.workload import add_workload_arguments, generate, load_tokenizer, spec_from_args


def copy_names(models: list[str], copies: int) -> list[str]:
    """Each model `copies` times, copy k named NAME-k: the copies of one model side by side."""
    return [f"{m}-{k}" for m in models for k in range(copies)]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(p, models=["llama-demo", "qwen-demo", "mistral-demo"])
    p.add_argument("--out", default="trace.jsonl", help="where to write the trace")
    p.add_argument(
        "--copies", type=int, default=1, help="list each model K times as NAME-0 .. NAME-(K-1)"
    )
    p.add_argument(
        "--from-trace",
        metavar="FILE",
        help="import a local ShareGPT (JSON) or LMSYS-Chat-1M (JSONL) conversation dump",
    )
    p.add_argument(
        "--trace-limit", type=int, metavar="N", help="--from-trace: the first N records only"
    )
    args = p.parse_args()
    if args.copies < 1:
        p.error(f"--copies must be at least 1, got {args.copies}")
    if args.copies > 1:
        args.models = copy_names(args.models, args.copies)
    if args.from_trace:
        return from_trace(p, args)
    try:
        spec = spec_from_args(args)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    except ValueError as e:
        p.error(str(e))
    entries, meta = generate(spec, tokenizer)
    write_trace(args.out, entries, meta)
    counts = Counter(e.model for e in entries)
    print(f"wrote {len(entries)} requests over {spec.duration_s:g}s to {args.out}", file=sys.stderr)
    for model, rate in zip(spec.models, spec.model_rates(), strict=True):
        print(f"  {model}: {counts[model]} requests (mean {rate:.2f} req/s)", file=sys.stderr)
    return 0


def from_trace(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`--from-trace`: the dump's conversations as a trace for `--models`."""
    models = args.models or ["llama-demo", "qwen-demo", "mistral-demo"]
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        entries, meta = import_conversations(
            args.from_trace,
            models,
            args.rate,
            tokenizer=tokenizer,
            alpha=args.alpha,
            cv=1.0 if args.arrival == "poisson" else args.cv,
            seed=args.seed,
            limit=args.trace_limit,
            max_total_len=args.max_total_len,
        )
    except ValueError as e:  # TraceImportError included: it names the file and record
        p.error(str(e))
    write_trace(args.out, entries, meta)
    print(
        f"wrote {len(entries)} requests from {meta['conversations_read']} conversations of "
        f"{args.from_trace} over {meta['nominal_duration_s']:g}s to {args.out}",
        file=sys.stderr,
    )
    skipped = ", ".join(f"{n} {why}" for why, n in meta["skipped"].items() if n)
    if skipped:
        print(f"  skipped: {skipped}", file=sys.stderr)
    for model, n in meta["requests_per_model"].items():
        source = [k for k, v in meta["model_map"].items() if v == model]
        print(
            f"  {model}: {n} requests" + (f" (from {source[0]})" if source else ""), file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
