"""Setups that used to end in a raw traceback now fail with a ConfigError naming the key:
a config path that is a directory or not text, a CUDA device on a machine without one, tensor
parallelism without worker processes (in a model or in a plan's mesh)."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.config import load_config, parse_config
from muxserve.engine import resolve_device
from muxserve.errors import ConfigError

pytestmark = pytest.mark.skipif(
    __import__("torch").cuda.device_count() > 0, reason="needs a machine without CUDA"
)


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not a config file (YAML)"


def test_a_binary_file_is_not_a_config(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x89\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == f"{p}: not a text file: invalid start byte at byte 0"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "engine.device: 'cuda', but this machine has no CUDA device; use cpu or auto"),
        ("cuda:1", "engine.device: 'cuda:1', but this machine has no CUDA device; use cpu or auto"),
        ("tpu", "engine.device: 'tpu' is not a device"),
    ],
)
def test_a_device_this_machine_lacks(device: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_device(device)
    assert str(info.value).startswith(message)


def test_tensor_parallel_needs_worker_processes() -> None:
    raw = {"models": [{"name": "a", "path": "/a", "tensor_parallel": 2}]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert str(info.value) == (
        "<config>: <root>: models.0: a has tensor_parallel=2, which needs worker processes: "
        "set engine.executor: mps"
    )
    parse_config({**raw, "engine": {"executor": "mps"}})  # fine with worker processes


def test_a_plans_tensor_parallel_needs_worker_processes() -> None:
    raw = {
        "models": [{"name": "a", "path": "/a"}],
        "meshes": [{"name": "m", "gpus": [0, 1], "models": [{"name": "a", "tensor_parallel": 2}]}],
    }
    with pytest.raises(ConfigError, match=r"meshes\.0\.models\.0: a has tensor_parallel=2"):
        parse_config(raw)
