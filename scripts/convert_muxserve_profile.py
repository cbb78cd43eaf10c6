"""Convert MuxServe's published A100-80GB latency table into a planner profile table.

The MuxServe authors measured LLaMA-7B/13B/30B/65B (fp16) on A100-SXM-80GB: ms per step for
the whole batch, keyed model -> GPUs (tensor parallel) -> SM % (MPS, 30-100) -> batch ->
sequence length -> prefill / decoding (hao-ai-lab/MuxServe, examples/placement/llama.json,
Apache-2.0; -1 = not measured). This writes it in `muxserve-profile/1` form
(docs/placement.md): prefill latency against the job's tokens (batch x length; the median
where several shapes have the same tokens), decode latency on a batch x context grid.

Isolated spikes — a point more than 1.25x a point that should take at least as long (a
larger batch or longer sequence of the same grid) — are replaced by that point and listed in
the notes beside the table. A decode row missing its longest contexts is extrapolated
linearly from the two before; a row with fewer than two points is dropped.

    git -C MuxServe show 2231480:examples/placement/llama.json > llama.json
    python scripts/convert_muxserve_profile.py llama.json \
        --out configs/profiles/a100-80gb-muxserve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from muxserve.models.hf_config import load_hf_config  # noqa: E402
from placement.specs import spec_from_config  # noqa: E402

SOURCE = "hao-ai-lab/MuxServe@2231480 examples/placement/llama.json (Apache-2.0)"
SPIKE = 1.25  # a point this much above a point that should be slower is a spike
PHASES = {"prefill": "prefill", "decoding": "decode"}


def arch_keys() -> dict[str, str]:
    """Our profile key (architecture and fp16) of each LLaMA model the table covers."""
    out = {}
    for size in ("7b", "13b", "30b", "65b"):
        cfg = load_hf_config(ROOT / "configs" / "models" / f"llama-{size}")
        out[f"llama-{size}"] = spec_from_config(size, "", cfg, "float16").arch_key
    return out


def despike(grid: dict[int, dict[int, float]]) -> list[tuple[int, int, float, float]]:
    """Replace spikes in place (batch -> length -> ms; missing points absent); returns
    (batch, length, measured, replaced by) for each."""
    fixed = []
    for b in sorted(grid):
        for length in sorted(grid[b]):
            later = [
                grid[b2][l2]
                for b2 in grid
                for l2 in grid[b2]
                if b2 >= b and l2 >= length and (b2, l2) != (b, length)
            ]
            if later and grid[b][length] > SPIKE * min(later):
                fixed.append((b, length, grid[b][length], min(later)))
                grid[b][length] = min(later)
    return fixed


def convert(raw: dict) -> tuple[dict, list[str]]:
    keys = arch_keys()
    entries, notes = [], []
    for name in sorted(raw, key=lambda n: list(keys).index(n)):
        for tp in sorted(raw[name], key=int):
            for sm in sorted(raw[name][tp], key=int):
                cell = raw[name][tp][sm]
                for phase, ours in PHASES.items():
                    grid = {
                        int(b): {
                            int(length): float(v[phase])
                            for length, v in row.items()
                            if float(v[phase]) > 0
                        }
                        for b, row in cell.items()
                    }
                    grid = {b: row for b, row in grid.items() if row}
                    for b, length, was, now in despike(grid):
                        notes.append(
                            f"{name} tp {tp} sm {sm}% {phase} batch {b} length {length}: "
                            f"{was:.2f} ms -> {now:.2f} ms"
                        )
                    head = {"model": keys[name], "tp": int(tp), "sm": int(sm) / 100}
                    if ours == "prefill":
                        by_tokens: dict[int, list[float]] = {}
                        for b, row in grid.items():
                            for length, ms in row.items():
                                by_tokens.setdefault(b * length, []).append(ms)
                        tokens = sorted(by_tokens)
                        lat = [statistics.median(by_tokens[t]) / 1e3 for t in tokens]
                        entries.append({**head, "phase": "prefill", "tokens": tokens,
                                        "latency_s": lat})  # fmt: skip
                    else:
                        entries.append({**head, "phase": "decode", **decode_grid(grid)})
    return {"format": "muxserve-profile/1", "gpu": "A100-80GB", "entries": entries}, notes


def decode_grid(grid: dict[int, dict[int, float]]) -> dict:
    """Rows on one context grid: missing long contexts extrapolated, short rows dropped."""
    contexts = sorted({length for row in grid.values() for length in row})
    batches, rows = [], []
    for b in sorted(grid):
        row = grid[b]
        have = [c for c in contexts if c in row]
        if len(have) < 2 or have != contexts[: len(have)]:
            continue
        values = [row[c] for c in have]
        for c in contexts[len(have) :]:
            (c1, v1), (c2, v2) = (have[-2], values[-2]), (have[-1], values[-1])
            values.append(v2 + max(v2 - v1, 0.0) / (c2 - c1) * (c - c2))
            have.append(c)
        batches.append(b)
        rows.append([v / 1e3 for v in values])
    return {"batch": batches, "context": contexts, "latency_s": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="MuxServe's examples/placement/llama.json")
    ap.add_argument("--out", type=Path, default=ROOT / "configs/profiles/a100-80gb-muxserve.json")
    args = ap.parse_args()
    table, notes = convert(json.loads(args.source.read_text()))
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    notes_path = args.out.with_suffix(".spikes.txt")
    notes_path.write_text(
        f"# Spikes replaced when converting {SOURCE}\n"
        "# (a point > 1.25x a point of the same grid with a larger batch or length)\n"
        + "".join(f"{n}\n" for n in notes)
    )
    print(f"wrote {args.out} ({len(table['entries'])} entries) and {notes_path} "
          f"({len(notes)} spikes)", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
