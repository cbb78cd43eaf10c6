"""SM quotas inside one process: a CUDA stream per (model, phase), in a green context if possible.

A green context owns a fixed subset of the GPU's SMs, so kernels launched on its stream cannot
spread over the whole device; a plain stream only gives concurrency, not a quota. torch 2.13
exposes green contexts as `torch.cuda.green_contexts.GreenContext` (beta, needs CUDA 12.4+ and a
torch built with it); elsewhere we fall back to plain streams and say so once in the log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class SMPartition:
    """Where one (model, phase) launches its kernels on a GPU."""

    stream: torch.cuda.Stream
    num_sms: int | None  # SMs of its green context; None: a plain stream over all SMs
    context: object | None = None  # the GreenContext, kept alive as long as its stream


def green_context_sms(share: float, total_sms: int, major: int) -> int:
    """SMs to ask of a green context for `share` of `total_sms`, rounded up to the split unit.

    The driver splits SMs in groups (8 on compute capability 9.x, 2 before), with the same minimum.
    """
    unit = 8 if major >= 9 else 2
    want = max(unit, math.ceil(share * total_sms / unit) * unit)
    return min(want, total_sms)


def green_contexts_supported() -> bool:
    """Whether this torch was built with green contexts (it says nothing about the driver)."""
    try:
        from torch.cuda import green_contexts
    except ImportError:
        return False
    return bool(getattr(green_contexts, "SUPPORTED", False))


def make_partition(device: torch.device, share: float) -> SMPartition:
    """A stream for `share` of `device`'s SMs: a green context's where possible, else plain."""
    if share >= 1.0 or not green_contexts_supported():
        if share < 1.0:
            log.warning("torch has no green contexts: SM share %.2f is not enforced", share)
        return SMPartition(torch.cuda.Stream(device), None)
    from torch.cuda.green_contexts import GreenContext

    props = torch.cuda.get_device_properties(device)
    num_sms = green_context_sms(share, props.multi_processor_count, props.major)
    try:
        ctx: Any = GreenContext.create(num_sms=num_sms, device_id=device.index or 0)
        return SMPartition(ctx.Stream(), num_sms, ctx)
    except RuntimeError as e:  # an old driver: concurrency without a quota
        log.warning("green context of %d SMs failed (%s): using a plain stream", num_sms, e)
        return SMPartition(torch.cuda.Stream(device), None)
