"""Timing on a CUDA device, shared by the GPU benchmarks and the GPU test suite.

A kernel of a few microseconds is shorter than the Python that launches it, so events around
one call measure the launch, not the kernel: the device sits idle between the start event and
the kernel while the host is still in Python. Both timers here keep the device busy between
their events: `cuda_time` enqueues `inner` calls back to back (the host runs ahead of the
device once the queue fills), `graph_time` replays one CUDA graph of `inner` calls (no host
work at all between them). Each sample is the time of the whole run divided by `inner`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

DEFAULT_INNER = 10  # calls per timed sample


def cuda_time(
    fn: Callable[[], object], repeat: int = 20, warmup: int = 3, inner: int = DEFAULT_INNER
) -> float:
    """Median seconds per call of `fn()` on the current stream: `repeat` samples of `inner`
    calls launched back to back between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def graph_time(
    fn: Callable[[], object], repeat: int = 20, warmup: int = 3, inner: int = DEFAULT_INNER
) -> float:
    """Median seconds per call of `fn()` replayed from one CUDA graph of `inner` calls: what the
    device takes, with no launch overhead at all. `fn` must be capturable (no host syncs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture (allocations, library handles)
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return cuda_time(graph.replay, repeat, warmup=1, inner=1) / inner


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeat: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s: (bytes read + written) / time of a copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), repeat, inner=2)
