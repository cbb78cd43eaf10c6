"""One engine in a fresh process, for tests/gpu/test_mps.py: MPS attaches at CUDA's first
initialisation, so every MPS engine needs a process that has not touched CUDA yet.

    python tests/gpu/mps_child.py CHECKPOINT EXECUTOR DECODE_SHARE   -> one JSON line on stdout
"""

from __future__ import annotations

import json
import sys
import time

from muxserve.config import parse_config
from muxserve.engine import MuxEngine
from muxserve.sampling_params import SamplingParams

REQUESTS = 32
PROMPT_TOKENS = 32
OUTPUT_TOKENS = 128


def main(checkpoint: str, executor: str, share: float) -> dict[str, object]:
    config = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "path": checkpoint,
                    "dtype": "bfloat16",
                    "sm_share": {"prefill": 1.0, "decode": share},
                }
            ],
            "engine": {
                "device": "cuda",
                "executor": executor,
                "kv_pool_bytes": 4 << 30,
                "block_bytes": 16 << 10,
                "max_batch_size": REQUESTS,
            },
        }
    )
    engine = MuxEngine(config)
    daemon = getattr(engine.executor, "daemon", None)
    try:
        params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
        engine.generate([[5] * PROMPT_TOKENS] * 2, SamplingParams(max_tokens=4), model="m")
        prompts = [[(7 * i + j) % 1000 + 3 for j in range(PROMPT_TOKENS)] for i in range(REQUESTS)]
        t0 = time.perf_counter()
        done = engine.generate(prompts, params, model="m")
        seconds = time.perf_counter() - t0
    finally:
        engine.shutdown()
    errors = [c.error for c in done if c.error]
    tokens = sum(len(c.token_ids) for c in done)
    return {
        "executor": executor,
        "decode_share": share,
        "errors": errors,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "first_tokens": list(done[0].token_ids[:16]),
        "daemon_dir_left": None if daemon is None else daemon.root.exists(),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], float(sys.argv[3]))))
