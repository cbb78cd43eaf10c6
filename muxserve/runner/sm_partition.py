"""SM quotas inside one process: a CUDA stream per (model, phase), in a green context if possible.

A green context owns a fixed subset of the GPU's SMs, so kernels launched on its stream cannot
spread over the whole device; a plain stream only gives concurrency, not a quota.

The device is split **once**: `cuDevSmResourceSplitByCount` cuts its SMs into equal groups of
the driver's split unit (8 SMs on an H100/H200), and each (model, phase) gets a green context
over its own groups, `floor(share × SMs / unit)` of them (at least one). torch 2.13's
`GreenContext.create(num_sms=...)` cannot be used for this: it splits the whole device anew on
every call, so every context gets the same first N SMs (PyTorch issue 195378) and two shares of
0.5 would share 72 of an H200's 132 SMs while 60 stay idle. The split goes through cuda-python's
driver API (`pip install cuda-bindings`, the major version of the driver's CUDA).

Where the shares add up to more than the device (a model's prefill and decode of 0.6 and 0.4
next to another's), partitions must overlap; the layout keeps apart the pairs that the
scheduler's SM admission can run at once (shares summing to at most 1) wherever it can, and
stacks those it never runs together.

Fallbacks, each said once in the log: without cuda-bindings a single partition uses torch's
`GreenContext` (one context cannot overlap another) and several use plain streams; a driver that
refuses green contexts gives plain streams.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

# A share is compared with a count of SM groups: 0.5 x 132 / 8 is 8.25 groups, and 0.3 x 80 / 8
# must be 3, not 2.9999999999999996 -> 2.
EPS = 1e-9

# SMs of a stream that runs inside a green context, by its handle (`cuda_stream`): the split-K
# plan of the decode kernel sizes its launch to the SMs its stream may use
# (muxserve/runner/kernels/ops.py).
_STREAM_SMS: dict[int, int] = {}


@dataclass
class SMPartition:
    """Where one (model, phase) launches its kernels on a GPU."""

    stream: torch.cuda.Stream
    num_sms: int | None  # SMs of its green context; None: a plain stream over all SMs
    context: object | None = None  # what keeps the green context alive as long as its stream
    close_fn: Callable[[], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        """Destroy the green context and its stream (idempotent); plain streams need nothing."""
        _STREAM_SMS.pop(int(self.stream.cuda_stream), None)
        if self.close_fn is not None:
            fn, self.close_fn = self.close_fn, None
            fn()


def stream_sms(stream_handle: int) -> int | None:
    """SMs a green-context stream may use, or None for any other stream (all of the device's)."""
    return _STREAM_SMS.get(stream_handle)


# ---- the arithmetic (no device) ------------------------------------------------------------
def split_unit(major: int) -> int:
    """The driver's SM split granularity when it does not report one (CUDA driver API guide:
    groups of 8 SMs on compute capability 9.x and later, 2 before)."""
    return 8 if major >= 9 else 2


def share_groups(share: float, total_sms: int, group_sms: int, num_groups: int) -> int:
    """Groups of `group_sms` SMs for `share` of the device's `total_sms`: rounded down (a share
    is a ceiling the scheduler admits jobs under, never exceeded), at least one, at most all."""
    return max(1, min(num_groups, math.floor(share * total_sms / group_sms + EPS)))


def may_run_together(a: float, b: float) -> bool:
    """Whether the scheduler's SM admission can run jobs of these two shares at once without
    its overload allowance: those should not share SMs."""
    return a + b <= 1.0 + EPS


def assign_groups(
    shares: Mapping[K, float], num_groups: int, group_sms: int, total_sms: int
) -> dict[K, tuple[int, ...]]:
    """Which of the device's `num_groups` SM groups each partition gets.

    Largest shares first; each takes its `share_groups` groups with the fewest partitions on
    them that it may run together with (then the lowest index). So partitions are disjoint
    when they fit; otherwise pairs that never run at once are stacked and pairs that may are
    kept apart where the groups allow.
    """
    order = sorted(shares, key=lambda k: -shares[k])  # stable: ties keep their given order
    placed: list[tuple[float, frozenset[int]]] = []
    out: dict[K, tuple[int, ...]] = {}
    for key in order:
        share = shares[key]
        count = share_groups(share, total_sms, group_sms, num_groups)

        def cost(g: int, share: float = share) -> tuple[int, int]:
            clash = sum(1 for s, gs in placed if g in gs and may_run_together(s, share))
            return clash, g

        chosen = tuple(sorted(sorted(range(num_groups), key=cost)[:count]))
        placed.append((share, frozenset(chosen)))
        out[key] = chosen
    return out


def overlap_sms(layout: Mapping[K, tuple[int, ...]], group_sms: int) -> int:
    """SMs given to more than one partition (0 when the partitions are disjoint)."""
    seen: dict[int, int] = {}
    for groups in layout.values():
        for g in groups:
            seen[g] = seen.get(g, 0) + 1
    return sum(group_sms for n in seen.values() if n > 1)


# ---- making the partitions -----------------------------------------------------------------
def make_partitions(device: torch.device, shares: Mapping[K, float]) -> dict[K, SMPartition]:
    """One stream per key for its `share` of `device`'s SMs, green contexts from one split.

    Keys with a share of 1 (or more) get plain streams over the whole device.
    """
    parts = {k: _plain(device) for k, s in shares.items() if s >= 1.0}
    sub = {k: s for k, s in shares.items() if s < 1.0}
    if not sub:
        return parts
    driver = _driver()
    if driver is not None:
        try:
            parts.update(_split_partitions(driver, device, sub))
            return parts
        except RuntimeError as e:  # an old driver: concurrency without a quota
            log.warning("green contexts failed (%s): SM shares are not enforced", e)
    elif len(sub) == 1:  # one context cannot overlap another: torch's own is enough
        [(key, share)] = sub.items()
        parts[key] = _torch_green_context(device, share)
        return parts
    else:
        log.warning(
            "cuda-bindings is not installed (pip install cuda-bindings): %d SM shares below 1 "
            "run on plain streams, not enforced",
            len(sub),
        )
    parts.update({k: _plain(device) for k in sub})
    return parts


def make_partition(device: torch.device, share: float) -> SMPartition:
    """A stream for `share` of `device`'s SMs (one partition: scripts and tests)."""
    return make_partitions(device, {0: share})[0]


def green_contexts_supported() -> bool:
    """Whether this torch was built with green contexts (it says nothing about the driver)."""
    try:
        from torch.cuda import green_contexts
    except ImportError:
        return False
    return bool(getattr(green_contexts, "SUPPORTED", False))


def _plain(device: torch.device) -> SMPartition:
    return SMPartition(torch.cuda.Stream(device), None)


def _driver() -> Any | None:
    """cuda-python's driver module, or None where it is not installed."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    return driver


def _check(result: Any) -> Any:
    """Unpack a cuda-bindings call's `(CUresult, *outputs)`; RuntimeError naming the error."""
    err, *out = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {int(err)} ({getattr(err, 'name', err)})")
    return out[0] if len(out) == 1 else tuple(out)


def _split_partitions(
    drv: Any, device: torch.device, shares: Mapping[K, float]
) -> dict[K, SMPartition]:
    """Split the device's SMs once and make one green context (and stream) per key."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.init()  # the primary context torch uses exists before the green ones
    dev = _check(drv.cuDeviceGet(index))
    resource = _check(
        drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    )
    total = int(resource.sm.smCount)
    # the driver reports its granularity (CUDA 13); older bindings: the documented table
    unit = max(
        int(getattr(resource.sm, "minSmPartitionSize", 0) or 0),
        int(getattr(resource.sm, "smCoscheduledAlignment", 0) or 0),
    ) or split_unit(torch.cuda.get_device_capability(index)[0])
    groups, count, _remainder = _check(
        drv.cuDevSmResourceSplitByCount(total // unit, resource, 0, unit)
    )
    groups = list(groups)[: int(count)]
    if not groups:
        raise RuntimeError(f"the driver split {total} SMs into no group of {unit}")
    group_sms = int(groups[0].sm.smCount)
    layout = assign_groups(shares, len(groups), group_sms, total)
    if overlap := overlap_sms(layout, group_sms):
        log.warning(
            "SM shares add up to %.2f of the device: %d of %d SMs are shared by partitions "
            "that may run at once",
            sum(shares.values()),
            overlap,
            total,
        )
    parts: dict[K, SMPartition] = {}
    try:
        for key, ids in layout.items():
            parts[key] = _green_partition(drv, dev, device, [groups[i] for i in ids], group_sms)
    except BaseException:
        for p in parts.values():
            p.close()
        raise
    log.info(
        "SM partitions of %s (%d SMs, groups of %d): %s",
        device,
        total,
        group_sms,
        {str(k): p.num_sms for k, p in parts.items()},
    )
    return parts


def _green_partition(
    drv: Any, dev: Any, device: torch.device, groups: list[Any], group_sms: int
) -> SMPartition:
    """A green context over these groups of one split, and a non-blocking stream in it."""
    desc = _check(drv.cuDevResourceGenerateDesc(groups, len(groups)))
    flags = drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
    green = _check(drv.cuGreenCtxCreate(desc, dev, flags))
    try:
        raw = _check(
            drv.cuGreenCtxStreamCreate(green, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0)
        )
    except RuntimeError:
        drv.cuGreenCtxDestroy(green)
        raise
    stream = torch.cuda.get_stream_from_external(int(raw), device)
    num_sms = group_sms * len(groups)
    _STREAM_SMS[int(stream.cuda_stream)] = num_sms

    def close() -> None:
        # the stream's pending work finishes first: cuStreamDestroy does not wait, nor fail
        drv.cuStreamDestroy(raw)
        drv.cuGreenCtxDestroy(green)

    return SMPartition(stream, num_sms, (green, raw), close)


def _torch_green_context(device: torch.device, share: float) -> SMPartition:
    """torch's own green context, for a lone partition (its per-call split cannot overlap)."""
    if not green_contexts_supported():
        log.warning("torch has no green contexts: SM share %.2f is not enforced", share)
        return _plain(device)
    from torch.cuda.green_contexts import GreenContext

    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    unit = split_unit(props.major)
    total = props.multi_processor_count
    num_sms = unit * share_groups(share, total, unit, total // unit)
    try:
        ctx: Any = GreenContext.create(num_sms=num_sms, device_id=index)
    except RuntimeError as e:  # an old driver: concurrency without a quota
        log.warning("green context of %d SMs failed (%s): using a plain stream", num_sms, e)
        return _plain(device)
    stream = ctx.Stream()
    _STREAM_SMS[int(stream.cuda_stream)] = num_sms
    return SMPartition(stream, num_sms, ctx)
