"""Generate a multi-model workload trace (JSONL) for `muxserve bench`.

    python scripts/gen_workload.py --models llama-demo qwen-demo mistral-demo \\
        --rate 6 --duration 60 --alpha 1.0 --arrival gamma --cv 2 --ramp staggered \\
        --prompt-len chat:48:256 --output-len uniform:16:64 \\
        --tokenizer ~/.cache/muxserve/demo-models/llama-demo --seed 0 --out trace.jsonl

Model i's mean rate is proportional to (i + 1) ** -alpha; arrivals are a gamma renewal
process with the given coefficient of variation (1 with --arrival poisson); --ramp staggered
makes each model's rate rise and fall in turn. Lengths: fixed:N, uniform:LO:HI, or
chat:MEAN[:MAX] (log-normal, long-tailed). The same options and seed give the same file.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from muxserve.bench.trace import write_trace
from muxserve.bench.workload import add_workload_arguments, generate, load_tokenizer, spec_from_args


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(p, models=["llama-demo", "qwen-demo", "mistral-demo"])
    p.add_argument("--out", default="trace.jsonl", help="where to write the trace")
    args = p.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
