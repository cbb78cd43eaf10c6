"""CPU memory for a model's weights: one private anonymous mapping, advised into huge pages.

A batch-1 decode step reads every weight once, so its speed follows how fast the CPU walks
through them. torch's allocator gives a model's parameters heap memory in 4 KiB pages where
transparent huge pages are `madvise`-only (a common default); transformers computes from the
safetensors file's mapped pages instead. Measured on a 58M-parameter Llama (issue 11), the
engine's batch-1 decode step was 1.02-1.03x HF's with its weights on the heap, and at or below
HF's with them in memory advised `MADV_HUGEPAGE` (2 MiB pages: one TLB entry for 512 of the
4 KiB ones), while keeping the file's mapped pages instead gained less.

Each parameter starts on a 64-byte boundary, except the LM head (`skewed`), which starts
`SKEW` (32) bytes past one. MKL's sgemm (the float32 `linear` of torch's CPU build) multiplies
by the 64-byte-aligned head slower, and by aligned narrower matrices faster at one row, when
the weights stream from memory. Measured on a 2-core AMD EPYC (AVX2, oneMKL 2024.0), one
thread, huge pages, the engine's decode step on `scripts/bench_vs_hf.py`'s 150M model
(vocabulary 32000, hidden 1024, MLP 2816) with every parameter aligned against every one
skewed, thread CPU ms per step by matrix: at batch 1 the 32000 x 1024 head 7.9 -> 7.2, but
gate/up 10.9 -> 11.7 and q/o 4.0 -> 4.6; at batch 16 the head 35.7 -> 30.8 (gate/up within
noise). transformers computes from the safetensors file's pages, where a tensor lands wherever
the header's length puts it (here 16 bytes past a 64-byte boundary): the head was most of the
4% by which MuxEngine's 16 x 128 decode step trailed HF's (`scripts/profile_vs_hf.py` shows
both steps op by op). With the head alone skewed, `scripts/bench_weight_memory.py --sides
aligned arena` (both placements in one process, load 5-8) measured the step at 0.960x -> 0.942x
HF's at batch 1 and 1.025x -> 0.999x at 16 x 128. 32 bytes keeps every AVX2 load aligned.

`materialize_in_arena` gives every parameter of a model built on the meta device a view into
one such mapping, writable like any tensor; the mapping lives as long as any of its views (the
tensors hold the mapping object) and is unmapped with the last one. Where the platform has no
`MADV_HUGEPAGE`, or the kernel refuses the advice, the mapping is used as it is (4 KiB pages):
the advice is a hint, never a requirement.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Collection

import torch
from torch import nn

ALIGN = 64  # bytes: a cache line; each parameter gets whole lines
SKEW = 32  # bytes past a line's start where a skewed parameter begins (see above)
HUGE_PAGE = 2 << 20  # the mapping's size is rounded up to this


def materialize_in_arena(model: nn.Module, skewed: Collection[torch.Tensor] = ()) -> int:
    """Give each meta parameter of `model` CPU memory in one huge-page-advised mapping (shared
    parameters, e.g. tied embeddings, once), and each meta buffer ordinary CPU memory: on a
    64-byte boundary, or `SKEW` bytes past one for the parameters in `skewed`. Returns the
    mapping's size in bytes (0 when the model has no meta parameters). The new memory is
    uninitialised, as `Module.to_empty` leaves it."""
    skew_ids = {id(p) for p in skewed}
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and p.is_meta:
                params.setdefault(id(p), p)
    offsets: dict[int, int] = {}
    size = 0
    for key, p in params.items():
        skew = SKEW if key in skew_ids else 0
        offsets[key] = size + skew
        size += -(-(skew + p.numel() * p.element_size()) // ALIGN) * ALIGN
    if params:
        size = -(-size // HUGE_PAGE) * HUGE_PAGE
        arena = _huge_page_bytes(size)
        placed = {
            key: nn.Parameter(
                arena[offsets[key] : offsets[key] + p.numel() * p.element_size()]
                .view(p.dtype)
                .view(p.shape),
                requires_grad=p.requires_grad,
            )
            for key, p in params.items()
        }
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in offsets:
                module._parameters[name] = placed[id(p)]
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device="cpu")
    return size if params else 0


def _huge_page_bytes(size: int) -> torch.Tensor:
    """`size` bytes of private anonymous memory as a uint8 tensor, advised into huge pages."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        # a kernel built without transparent huge pages refuses: 4 KiB pages it is
        with contextlib.suppress(OSError):
            buf.madvise(advice)
    return torch.frombuffer(buf, dtype=torch.uint8)  # holds `buf` until its last view goes
