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

Where a matrix `F.linear` multiplies by is at least as tall as it is wide (`in <= out`: q/o
and k/v under full multi-head attention, gate/up, the LM head), it is stored column-major: its
transpose, (in, out), lies row-major in the mapping and the parameter is that block's `.t()`
view, still (out, in) to every reader (loaders, sharding, `state_dict`). At one row MKL's
sgemv then streams the matrix row by row into `out` accumulators rather than taking `out` dot
products of `in` elements; with `in` as short as 512 or 1024 the dot products run at 14-15 GB/s,
the streaming at 20-35. Measured on the same EPYC, one thread, huge pages, thread CPU time per
product at one row, row-major -> column-major: 16000 x 512 2.17 -> 1.01 ms, 32000 x 1024 6.3 ->
4.9 ms, 1376 x 512 185 -> 121 us, 512 x 512 76 -> 69 us, 2816 x 1024 519 -> 389 us; wide
matrices lose (512 x 1376 150 -> 177 us, 256 x 1024 55 -> 93 us), so they stay row-major. At
16 to 256 rows (sgemm) the results are bit for bit the same and the time 0.71-1.12x; at one
row the sums are taken in another order (differences of float32 rounding, ~1e-6 relative).

Linears that read one input (q/k/v, gate/up: `muxserve.models.stacked`) are laid out back to
back as one stack, one (sum of out, in) matrix (column-major when it is at least as tall as
wide), so that the model multiplies by it once; their biases likewise. Only the stack's start
is aligned.

`materialize_in_arena` gives every parameter of a model built on the meta device a view into
one such mapping, writable like any tensor; the mapping lives as long as any of its views (the
tensors hold the mapping object) and is unmapped with the last one. Where the platform has no
`MADV_HUGEPAGE`, or the kernel refuses the advice, the mapping is used as it is (4 KiB pages):
the advice is a hint, never a requirement.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Collection, Sequence

import torch
from torch import nn

from muxserve.models.stacked import same_kind

ALIGN = 64  # bytes: a cache line; each parameter gets whole lines
SKEW = 32  # bytes past a line's start where a skewed parameter begins (see above)
HUGE_PAGE = 2 << 20  # the mapping's size is rounded up to this


def materialize_in_arena(
    model: nn.Module,
    skewed: Collection[torch.Tensor] = (),
    column_major: Collection[torch.Tensor] = (),
    stacks: Sequence[Sequence[torch.Tensor]] = (),
) -> int:
    """Give each meta parameter of `model` CPU memory in one huge-page-advised mapping (shared
    parameters, e.g. tied embeddings, once), and each meta buffer ordinary CPU memory: on a
    64-byte boundary, or `SKEW` bytes past one for the parameters in `skewed`; the 2-D
    parameters in `column_major` as the transposed view of a row-major (in, out) block (see
    `column_major_weights`). Each of `stacks` (matrices of one width, or vectors) is laid out
    as one block whose consecutive row blocks (pieces) they are, so that `stacked.stack_of`
    finds them as one tensor: column-major where its members are. Returns the mapping's size in
    bytes (0 when the model has no meta parameters). The new memory is uninitialised, as
    `Module.to_empty` leaves it."""
    skew_ids = {id(p) for p in skewed}
    transposed = {id(p) for p in column_major}
    if any(p.dim() != 2 for p in column_major):
        raise ValueError("only matrices can be stored column-major")
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and p.is_meta:
                params.setdefault(id(p), p)
    # units: parameters laid out as one block, in the order of their first member
    unit_of: dict[int, list[nn.Parameter]] = {}
    for stack in stacks:
        _check_stack(stack, transposed)
        members = [params[id(p)] for p in stack if id(p) in params]
        if members:
            if any(id(p) in unit_of or id(p) in skew_ids for p in members):
                raise ValueError("a parameter is in two stacks, or in a stack and skewed")
            for p in members:
                unit_of[id(p)] = members
    units: list[list[nn.Parameter]] = []
    for key, p in params.items():
        unit = unit_of.get(key, [p])
        if unit[0] is p:
            units.append(unit)
    offsets: list[int] = []
    size = 0
    for unit in units:
        skew = SKEW if id(unit[0]) in skew_ids else 0
        offsets.append(size + skew)
        nbytes = sum(p.numel() * p.element_size() for p in unit)
        size += -(-(skew + nbytes) // ALIGN) * ALIGN
    placed: dict[int, nn.Parameter] = {}
    if params:
        size = -(-size // HUGE_PAGE) * HUGE_PAGE
        arena = _huge_page_bytes(size)
        for unit, offset in zip(units, offsets, strict=True):
            nbytes = sum(p.numel() * p.element_size() for p in unit)
            views = _place(arena[offset : offset + nbytes], unit, id(unit[0]) in transposed)
            for p, view in zip(unit, views, strict=True):
                placed[id(p)] = nn.Parameter(view, requires_grad=p.requires_grad)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in placed:
                module._parameters[name] = placed[id(p)]
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device="cpu")
    return size if params else 0


def column_major_weights(
    model: nn.Module,
    head: torch.Tensor | None = None,
    stacks: Sequence[Sequence[torch.Tensor]] = (),
) -> list[torch.Tensor]:
    """The matrices a batch-1 step multiplies by faster column-major (see above): the weights
    of `model`'s `nn.Linear`s with `in_features <= out_features`, those of each stack of
    matrices (`stacks`) whose rows together are at least as many as its width, and `head` (the
    LM head, or the embedding it is tied to). A tied embedding looks its rows up strided then:
    a few microseconds per decode step, milliseconds per 2,048-token prefill."""
    stacked = {id(w) for stack in stacks for w in stack}
    found = {
        id(m.weight): m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear)
        and id(m.weight) not in stacked
        and m.in_features <= m.out_features
    }
    for stack in stacks:
        if stack[0].dim() == 2 and stack[0].shape[1] <= sum(w.shape[0] for w in stack):
            found |= {id(w): w for w in stack}
    if head is not None:
        found.setdefault(id(head), head)
    return list(found.values())


def _check_stack(stack: Sequence[torch.Tensor], transposed: set[int]) -> None:
    """A stack is matrices of one width and dtype, or vectors of one dtype, all column-major
    or none."""
    if not same_kind(stack):
        raise ValueError(
            "a stack is matrices of one width and dtype, or vectors of one dtype; got "
            + ", ".join(f"{tuple(p.shape)} {p.dtype}" for p in stack)
        )
    if len({id(p) in transposed for p in stack}) > 1:
        raise ValueError("a stack is column-major whole or not at all")


def _place(memory: torch.Tensor, unit: list[nn.Parameter], transposed: bool) -> list[torch.Tensor]:
    """`memory` (bytes) as tensors of `unit`'s dtype and shapes, back to back: row-major, or
    for matrices the `.t()` views of column blocks of their stack's row-major transpose."""
    typed = memory.view(unit[0].dtype)
    if transposed:
        cols = unit[0].shape[1]
        block = typed.view(cols, sum(p.shape[0] for p in unit))  # (in, sum of out)
        parts = block.split([p.shape[0] for p in unit], dim=1)
        return [part.t() for part in parts]
    parts = typed.split([p.numel() for p in unit])
    return [part.view(p.shape) for part, p in zip(parts, unit, strict=True)]


def _huge_page_bytes(size: int) -> torch.Tensor:
    """`size` bytes of private anonymous memory as a uint8 tensor, advised into huge pages."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        # a kernel built without transparent huge pages refuses: 4 KiB pages it is
        with contextlib.suppress(OSError):
            buf.madvise(advice)
    return torch.frombuffer(buf, dtype=torch.uint8)  # holds `buf` until its last view goes
