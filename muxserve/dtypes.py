"""The dtypes MuxServe serves in, and which one a model gets: one table, one rule.

Torch-free (the planner budgets memory with it on a machine without torch); `torch_dtype`
imports torch only when called. The engine and the planner both resolve a model's dtype with
`resolve_dtype`, so a plan budgets exactly the bytes that are served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Dtype = Literal["float32", "bfloat16", "float16"]  # every dtype a model is served in
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes of each
GPU_DEFAULT_DTYPE = "float16"  # on a GPU when neither the config nor the checkpoint says
CPU_DTYPE = "float32"  # on a CPU unless the config says: half precision is slow there
HALF_DTYPES = ("float16", "bfloat16")


def resolve_dtype(configured: str | None, checkpoint: str | None, on_gpu: bool) -> str:
    """The dtype a model is served in.

    The config's dtype when it names one; otherwise on a GPU the checkpoint's half dtype
    (float16 or bfloat16), else float16 (a float32 checkpoint is served in half precision,
    as the planner budgets it); on a CPU float32.
    """
    if configured is not None:
        if configured not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {configured!r}; use one of {', '.join(DTYPE_BYTES)}")
        return configured
    if not on_gpu:
        return CPU_DTYPE
    return checkpoint if checkpoint in HALF_DTYPES else GPU_DEFAULT_DTYPE


def dtype_bytes(name: str) -> int:
    """Bytes of one element of the dtype called `name`."""
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (one of `DTYPE_BYTES`)."""
    import torch

    dtype_bytes(name)  # refuses names outside the table
    dtype: torch.dtype = getattr(torch, name)
    return dtype
