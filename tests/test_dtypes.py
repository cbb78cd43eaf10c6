"""The serving dtype of a model: one rule for the engine and the planner."""

from __future__ import annotations

import re
from typing import get_args

import pytest
import torch

from muxserve.dtypes import DTYPE_BYTES, Dtype, dtype_bytes, resolve_dtype, torch_dtype
from muxserve.models.loader import MODEL_DTYPES


@pytest.mark.parametrize(
    ("configured", "checkpoint", "on_gpu", "expected"),
    [
        (None, "bfloat16", True, "bfloat16"),  # the checkpoint's half dtype on a GPU
        (None, "float16", True, "float16"),
        (None, "float32", True, "float16"),  # what the planner budgets, not the checkpoint's
        (None, None, True, "float16"),
        (None, "bfloat16", False, "float32"),  # a CPU computes in float32
        (None, None, False, "float32"),
        ("float32", "bfloat16", True, "float32"),  # the config wins everywhere
        ("bfloat16", None, False, "bfloat16"),
    ],
)
def test_resolve_dtype(
    configured: str | None, checkpoint: str | None, on_gpu: bool, expected: str
) -> None:
    assert resolve_dtype(configured, checkpoint, on_gpu) == expected


def test_one_table_for_bytes_and_torch_dtypes() -> None:
    assert [dtype_bytes(n) for n in ("float32", "bfloat16", "float16")] == [4, 2, 2]
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("float32") is torch.float32
    names = "; use one of float32, bfloat16, float16"
    with pytest.raises(ValueError, match=re.escape(f"unknown dtype 'int8'{names}")):
        dtype_bytes("int8")
    with pytest.raises(ValueError, match=re.escape(f"unknown dtype 'float64'{names}")):
        torch_dtype("float64")
    with pytest.raises(ValueError, match=re.escape(f"unknown dtype 'fp16'{names}")):
        resolve_dtype("fp16", None, True)


def test_one_table_of_served_dtypes() -> None:
    """The config's schema, the byte sizes and the loader's torch dtypes list the same names."""
    assert get_args(Dtype) == tuple(DTYPE_BYTES) == ("float32", "bfloat16", "float16")
    assert (torch.float32, torch.bfloat16, torch.float16) == MODEL_DTYPES
    assert [torch_dtype(n).itemsize for n in DTYPE_BYTES] == list(DTYPE_BYTES.values())
