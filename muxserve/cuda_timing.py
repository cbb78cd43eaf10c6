"""Timing on a CUDA device, shared by the GPU benchmarks and the GPU test suite."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_time(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn()` on the current stream, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeat: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s: (bytes read + written) / time of a copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), repeat)
