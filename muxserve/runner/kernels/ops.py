"""Attention over the unified pool: CUDA kernels on a GPU, the torch reference elsewhere.

The kernels (`csrc/`) read and write the pool in place; the reference is
`muxserve.runner.attention.PagedAttention`, whose methods each function here falls back to, so
the two paths share one definition of the math. `make_attention` gives the model's `Attention`
for a job: `PagedAttention` itself on CPU (or with `MUXSERVE_KERNELS=off`), `KernelAttention`
on CUDA. Prefill on CUDA gathers the sequences' K/V and calls torch's SDPA; docs/kernels.md
says why. The kernels are built on first use (nvcc, then a torch extension for the binding)
and cached under `$MUXSERVE_CACHE/kernels`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

from muxserve.models.causal_lm import Attention
from muxserve.runner.attention import BatchLayout, PagedAttention
from muxserve.runner.kernels.kernel_build import (
    EMULATED,
    KernelBuildError,
    build_kernels,
    build_plan,
)
from muxserve.runner.sm_partition import stream_sms

log = logging.getLogger(__name__)

KERNELS_ENV = "MUXSERVE_KERNELS"  # off (default) | auto | on | emulate
# Off by default until the GPU suite (tests/gpu) has passed on a real GPU: unvalidated kernels
# must not silently replace the reference path. Opt in with MUXSERVE_KERNELS=auto or on.
DEFAULT_KERNEL_MODE = "off"
KernelMode = Literal["auto", "on", "off", "emulate"]
MIN_PARTITION = 256  # fewest tokens a decode split is worth a CTA and a merge for
TARGET_CTAS_PER_SM = 32  # decode CTAs to aim for per SM (about 4 waves): a small last wave
ALIGN = 16  # bytes: the kernels read rows with 16-byte loads


def kernel_mode() -> KernelMode:
    """`MUXSERVE_KERNELS`: `auto` uses the kernels on CUDA when they build (else warns once and
    falls back to the reference), `on` raises if they do not build, `off` (the default, until
    they are validated on a GPU) never uses them, `emulate` runs them on CPU tensors through
    csrc/emulation/ (slow; for tests)."""
    mode = os.environ.get(KERNELS_ENV, "").strip().lower() or DEFAULT_KERNEL_MODE
    if mode in ("1", "true", "yes"):
        return "on"
    if mode in ("0", "false", "no"):
        return "off"
    if mode not in ("auto", "on", "off", "emulate"):
        raise ValueError(f"{KERNELS_ENV}={mode!r}: expected auto, on, off or emulate")
    return mode  # type: ignore[return-value]


# ---- loading (building is kernel_build.py), with the fallback the mode allows ---------------
@functools.cache
def load_kernels(arch: str) -> ModuleType | None:
    """`build_kernels` and one probe launch, or None (warned once) when either fails and the
    mode is not `on`.

    The probe matters as much as the build: a build against a runtime the driver cannot run
    succeeds and then fails at its first launch (CUDA error 35), which would fail every job
    instead of falling back here.
    """
    try:
        kernels = build_kernels(arch)
        probe_kernels(kernels, _probe_device(arch))
        return kernels
    except KernelBuildError as e:
        if kernel_mode() == "on":
            raise
        log.warning("CUDA kernels unavailable, using the torch reference: %s", e)
        return None


PROBE_HEAD_DIM = 64  # compiled for every dtype; 64 floats is 256 bytes, 16-byte aligned
PROBE_TOKENS_PER_BLOCK = 4


def probe_kernels(kernels: ModuleType, device: torch.device) -> None:
    """Write one token's K/V into a two-block pool and decode over it; KernelBuildError if the
    launch fails or the output is not that token's V (one key: its softmax weight is 1)."""
    hd, tpb = PROBE_HEAD_DIM, PROBE_TOKENS_PER_BLOCK
    try:
        cache = torch.zeros(2, 2, tpb, hd, device=device)  # two blocks of one (layer, kv head)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, hd, generator=gen).to(device) for _ in range(3))
        one = torch.ones(1, dtype=torch.int64, device=device)
        batch = BatchLayout(
            seq_of_token=one - 1,
            pos_of_token=one - 1,
            row_of_token=one - 1,
            q_lens=one,
            ctx_lens=one,
            block_tables=one.view(1, 1, 1, 1),  # block 1: block 0 must stay untouched
        )
        _write_kv(kernels, cache, k, v, batch, 0)
        out = _decode(kernels, q, cache, batch, 0, None, DecodePlan(1, tpb, None))
        out, written, untouched = out.cpu(), cache[1, :, 0].cpu(), cache[0].abs().sum().item()
    except (RuntimeError, ValueError) as e:  # the binding turns a CUDA error into RuntimeError
        raise KernelBuildError(f"the built kernels do not run here: {e}") from e
    want = torch.stack([k[0, 0], v[0, 0]]).cpu()
    if not torch.equal(written, want) or untouched != 0.0:
        raise KernelBuildError("probe: write_kv did not put one token's K/V where it belongs")
    if not torch.allclose(out, v.cpu(), rtol=1e-5, atol=1e-6):
        raise KernelBuildError("probe: decode over one token did not return its value row")


def _probe_device(arch: str) -> torch.device:
    if arch == EMULATED:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def kernels_for(device: torch.device) -> ModuleType | None:
    """The built kernels for `device`, or None: not CUDA, kernels off, or (auto) no build.

    On CPU only `MUXSERVE_KERNELS=emulate` gives kernels: the emulated build, for tests.
    """
    mode = kernel_mode()
    if device.type == "cpu" and mode == "emulate":
        return load_kernels(EMULATED)
    if device.type != "cuda" or mode in ("off", "emulate"):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return load_kernels(f"{major}{minor}")


def kernels_for_cache(cache: torch.Tensor) -> ModuleType | None:
    """The kernels if they can serve this pool view (device, head size, dtype, alignment)."""
    kernels = kernels_for(cache.device)
    if kernels is None or not supports_view(cache, kernels.supports_head_dim(cache.shape[3])):
        return None
    return kernels


def supports_view(cache: torch.Tensor, head_dim_compiled: bool) -> bool:
    """Whether the kernels can read this pool view: a compiled head size, a half or float dtype,
    rows and blocks 16-byte aligned (a pool whose block_bytes is not a multiple of 16 is not)."""
    item = cache.element_size()
    return (
        head_dim_compiled
        and cache.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and (cache.shape[3] * item) % ALIGN == 0
        and (cache.stride(0) * item) % ALIGN == 0
        and cache.data_ptr() % ALIGN == 0
    )


# ---- the three operations ------------------------------------------------------------------
def split_plan(
    num_seqs: int,
    num_kv_heads: int,
    group_size: int,
    max_context: int,
    window: int | None,
    num_sms: int,
) -> tuple[int, int]:
    """(num_splits, partition_size) of a decode launch.

    Split the context when there are too few (sequence, kv head) CTAs to fill the GPU several
    times over, but never into partitions under MIN_PARTITION tokens. The last split takes any
    tokens past `num_splits * partition_size`, so a low `max_context` costs speed, not results.
    """
    span = max(1, max_context if window is None else min(max_context, window))
    gmax = 1 if group_size == 1 else 2 if group_size == 2 else 4 if group_size <= 4 else 8
    ctas = max(1, num_seqs * num_kv_heads * math.ceil(group_size / gmax))
    want = math.ceil(TARGET_CTAS_PER_SM * num_sms / ctas)
    splits = max(1, min(want, span // MIN_PARTITION, 8192))
    if splits == 1:
        return 1, span
    partition = math.ceil(span / splits / 64) * 64
    return math.ceil(span / partition), partition


def write_kv(
    cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BatchLayout, layer: int
) -> None:
    """Store new K/V (T, Hkv, hd) in the pool view `cache` through the batch's block tables."""
    kernels = kernels_for_cache(cache)
    if kernels is None:
        PagedAttention(cache, batch, ()).write(layer, k, v)
        return
    _write_kv(kernels, cache, k, v, batch, layer)


def decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    batch: BatchLayout,
    layer: int,
    window: int | None,
    max_context: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence, q (B, Hq, hd) at position ctx - 1, over the
    pool (the K/V of these tokens already written); returns (B, Hq, hd).

    `max_context`, a bound on `batch.ctx_lens` known on the host, sizes the split-K launch;
    None reads it from the device (a sync).
    """
    kernels = kernels_for_cache(cache)
    if kernels is None:
        return PagedAttention(cache, batch, (), 1, max_context).attend_pool(layer, q, window)
    if max_context is None:
        max_context = int(batch.ctx_lens.max())
    plan = _decode_plan(cache, q.shape[0], q.shape[1], batch, max_context, window)
    return _decode(kernels, q, cache, batch, layer, window, plan)


# ---- the model's Attention -----------------------------------------------------------------
def make_attention(
    cache: torch.Tensor,
    batch: BatchLayout,
    sliding_windows: Sequence[int | None],
    max_q_len: int,
    max_context: int,
    softcap: float | None = None,
) -> Attention:
    """The `Attention` for one job: `KernelAttention` where the kernels serve this pool view,
    `PagedAttention` (the reference) elsewhere. `max_q_len` and `max_context` are the job's
    longest chunk and context, known on the host. The kernels have no score soft-capping: a
    model with `softcap` (Gemma 2) always gets the reference."""
    kernels = kernels_for_cache(cache)
    if kernels is None or softcap is not None:
        return PagedAttention(cache, batch, sliding_windows, max_q_len, max_context, softcap)
    return KernelAttention(kernels, cache, batch, sliding_windows, max_q_len, max_context)


@dataclass(frozen=True)
class DecodePlan:
    """A decode launch's split of the context and the workspace its partial results go to."""

    num_splits: int
    partition_size: int
    workspace: torch.Tensor | None  # float32, None with one split


class KernelAttention:
    """The model's `Attention` on CUDA: K/V written and (for decode) read in place by kernels.

    A decode job (one token per sequence) runs the paged decode kernel; a prefill job gathers
    and runs SDPA. Nothing here syncs with the device in a decode job, so a CUDA graph can
    capture it (muxserve/runner/cuda_graphs.py).
    """

    def __init__(
        self,
        kernels: ModuleType,
        cache: torch.Tensor,
        batch: BatchLayout,
        sliding_windows: Sequence[int | None],
        max_q_len: int,
        max_context: int,
    ) -> None:
        self.kernels = kernels
        self.cache = cache
        self.batch = batch
        self.windows = sliding_windows
        self.max_context = max_context
        self.is_decode = max_q_len == 1
        # prefill reuses the reference's gather, padding and masks
        self._reference = (
            None
            if self.is_decode
            else PagedAttention(cache, batch, sliding_windows, max_q_len, max_context)
        )
        self._plans: dict[int | None, DecodePlan] = {}

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        _write_kv(self.kernels, self.cache, k, v, self.batch, layer)
        window = self.windows[layer]
        if self._reference is not None:
            return _prefill_sdpa(self._reference, q, layer, window)
        plan = self._plans.get(window)
        if plan is None:  # one per window size: the workspace is reused by every layer
            plan = _decode_plan(
                self.cache, q.shape[0], q.shape[1], self.batch, self.max_context, window
            )
            self._plans[window] = plan
        return _decode(self.kernels, q, self.cache, self.batch, layer, window, plan)


def _stream(device: torch.device) -> int:
    """The current CUDA stream's handle, as the binding takes it (0 for the CPU emulation)."""
    return int(torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else 0


MPS_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def num_sms(device: torch.device) -> int:
    """SMs that kernels launched now may use: those of the current stream's green context, or
    this MPS client's share of the device, else all of it (1 for the CPU emulation, which runs
    blocks one after another). The decode split is sized to fill these, not the device."""
    if device.type != "cuda":
        return 1
    total = _num_sms(device.index or 0)
    green = stream_sms(int(torch.cuda.current_stream(device).cuda_stream))
    if green is not None:
        return green
    return mps_sms(total, os.environ.get(MPS_PERCENTAGE_ENV))


def mps_sms(total: int, percentage: str | None) -> int:
    """SMs of an MPS client limited to `percentage` of `total` (unset or unreadable: all)."""
    try:
        pct = float(percentage) if percentage else 100.0
    except ValueError:
        return total
    return max(1, min(total, math.floor(total * pct / 100)))


@functools.cache
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype with a contiguous, 16-byte aligned row per head."""
    x = x.to(dtype)
    if (
        x.stride(-1) != 1
        or x.data_ptr() % ALIGN
        or any((s * x.element_size()) % ALIGN for s in x.stride()[:-1])
    ):
        x = x.contiguous()
    return x


def _write_kv(
    kernels: ModuleType,
    cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: BatchLayout,
    layer: int,
) -> None:
    kernels.write_kv(
        cache,
        _rows(k, cache.dtype),
        _rows(v, cache.dtype),
        batch.block_tables,
        batch.seq_of_token,
        batch.pos_of_token,
        layer,
        _stream(cache.device),
    )


def _decode_plan(
    cache: torch.Tensor,
    num_seqs: int,
    num_heads: int,
    batch: BatchLayout,
    max_context: int,
    window: int | None,
) -> DecodePlan:
    kv_heads = batch.block_tables.shape[3]
    splits, partition = split_plan(
        num_seqs,
        kv_heads,
        num_heads // kv_heads,
        max_context,
        window,
        num_sms(cache.device),
    )
    workspace = None
    if splits > 1:
        floats = num_seqs * num_heads * splits * (cache.shape[3] + 2)
        workspace = torch.empty(floats, dtype=torch.float32, device=cache.device)
    return DecodePlan(splits, partition, workspace)


def _decode(
    kernels: ModuleType,
    q: torch.Tensor,
    cache: torch.Tensor,
    batch: BatchLayout,
    layer: int,
    window: int | None,
    plan: DecodePlan,
) -> torch.Tensor:
    q_rows = _rows(q, cache.dtype)
    out = torch.empty_like(q_rows)
    kernels.decode_attention(
        out,
        q_rows,
        cache,
        batch.block_tables,
        batch.ctx_lens,
        layer,
        window or 0,
        1.0 / math.sqrt(cache.shape[3]),
        plan.num_splits,
        plan.partition_size,
        plan.workspace,
        _stream(cache.device),
    )
    return out.to(q.dtype)


def _prefill_sdpa(
    ref: PagedAttention, q: torch.Tensor, layer: int, window: int | None
) -> torch.Tensor:
    """Gather each sequence's K/V of `layer`, then SDPA with the reference's mask. A prefill is
    compute-bound: the gather's extra pass over K/V is small next to it.

    Under GQA the K/V heads are repeated, not left to `enable_gqa`: only the flash backend
    takes `enable_gqa`, and it takes no mask, so the two together fall to the math backend
    (which materialises every score in fp32); repeated heads with a mask get the
    memory-efficient kernel.
    """
    keys, vals = ref.gather(layer)  # (B, Hkv, K, hd)
    group = q.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)  # (B, Hq, K, hd)
        vals = vals.repeat_interleave(group, dim=1)
    qpad = ref.pad_queries(q.to(keys.dtype))  # (B, Hq, Lq, hd)
    out = F.scaled_dot_product_attention(
        qpad, keys, vals, attn_mask=ref.mask(window)
    )  # (B, Hq, Lq, hd)
    return ref.unpad(out).to(q.dtype)


def _main(argv: Sequence[str] | None = None) -> int:
    """`python -m muxserve.runner.kernels.ops [ARCH]`: build (or find) the kernels ahead of
    serving."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("arch", nargs="?", help='"90", "80", ... or "emulated" (default: this GPU)')
    args = ap.parse_args(argv)
    arch = args.arch
    if arch is None:
        if torch.cuda.device_count() == 0:
            ap.error("no CUDA device: name the architecture, e.g. 90")
        arch = "".join(map(str, torch.cuda.get_device_capability()))
    build_kernels(arch)
    print(build_plan(arch).directory)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
