"""Checking and loading Hugging Face safetensors checkpoints (one file, or shards plus an index).

`validate_checkpoint` reads `config.json` and the safetensors headers only, so the engine can
check every model it is asked to serve before it allocates anything; `load_model` then builds the
model without initialising weights and fills it shard by shard.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from muxserve.errors import CheckpointError
from muxserve.models.hf_config import HFModelConfig, load_hf_config
from muxserve.models.llama import LlamaForCausalLM, parameter_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names we can cast from; quantized formats are not supported
LOADABLE_DTYPES = ("F64", "F32", "BF16", "F16")
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # a larger header means a corrupt file


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointPlan:
    """A validated checkpoint: its config and, per file, the tensors to load from it."""

    config: HFModelConfig
    shards: dict[Path, list[str]]


def validate_checkpoint(path: str | Path) -> HFModelConfig:
    """Check that a folder holds a servable checkpoint; return its parsed config.

    Reads `config.json` and the safetensors headers only (no tensor data). Raises
    `CheckpointError` (`UnsupportedArchitectureError` for an unknown family) naming the folder and
    the first missing, unexpected or wrong-shaped tensor, or the missing file.
    """
    return plan_checkpoint(path).config


def load_model(
    path: str | Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[LlamaForCausalLM, HFModelConfig]:
    """Build the model for a checkpoint folder and load its weights, cast to `dtype`, on `device`.

    Parameters are created on the meta device and allocated once, directly in `dtype` on
    `device`; each shard is memory-mapped and copied in tensor by tensor, so peak extra memory is
    one tensor. The model is returned in eval mode with gradients off.
    """
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"model dtype must be one of {MODEL_DTYPES}, got {dtype}")
    device = torch.device(device)
    plan = plan_checkpoint(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(plan.config)
    model = model.to(dtype=dtype).to_empty(device=device)  # (the .to on meta costs nothing)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for file, names in plan.shards.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    params[name].copy_(f.get_tensor(name))
    model.eval()
    model.requires_grad_(False)
    model.build_rope_cache(device)
    return model, plan.config


def plan_checkpoint(path: str | Path) -> CheckpointPlan:
    """`validate_checkpoint`, also returning which tensors to read from which file."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    config = load_hf_config(folder)
    found = _read_headers(folder)
    expected = parameter_shapes(config)

    for name, shape in expected.items():
        info = found.get(name)
        if info is None:
            raise CheckpointError(
                f"{folder}: tensor {name!r} (shape {shape}) is missing from the checkpoint"
            )
        if info.shape != shape:
            raise CheckpointError(
                f"{folder}: tensor {name!r} in {info.file.name} has shape {info.shape}, "
                f"expected {shape} from config.json"
            )
        if info.dtype not in LOADABLE_DTYPES:
            raise CheckpointError(
                f"{folder}: tensor {name!r} in {info.file.name} has dtype {info.dtype}; "
                f"supported: {', '.join(LOADABLE_DTYPES)} (quantized checkpoints are not)"
            )
    for name, info in sorted(found.items()):
        if name not in expected and not _ignorable(name, info, config):
            raise CheckpointError(
                f"{folder}: unexpected tensor {name!r} in {info.file.name} "
                f"(not part of a {config.architecture} with this config.json)"
            )

    shards: dict[Path, list[str]] = {}
    for name in expected:
        shards.setdefault(found[name].file, []).append(name)
    return CheckpointPlan(config, shards)


def _ignorable(name: str, info: TensorInfo, config: HFModelConfig) -> bool:
    # old conversions saved RoPE's inv_freq buffer; some tied checkpoints still carry lm_head
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return (
        name == "lm_head.weight"
        and config.tie_word_embeddings
        and info.shape == (config.vocab_size, config.hidden_size)
    )


def _read_headers(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of the checkpoint, by name, from the headers of its safetensors files."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = _read_index(index)
        by_file: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(name)
        found: dict[str, TensorInfo] = {}
        for file_name, names in by_file.items():
            file = folder / file_name
            if not file.exists():
                raise CheckpointError(
                    f"{folder}: shard {file_name} listed in {INDEX_FILE} is missing "
                    f"(it should hold {names[0]!r} and {len(names) - 1} more tensors)"
                )
            header = read_safetensors_header(file)
            for name in names:
                if name not in header:
                    raise CheckpointError(
                        f"{folder}: {INDEX_FILE} puts tensor {name!r} in {file_name}, "
                        "but that file does not hold it"
                    )
                found[name] = header[name]
        return found
    single = folder / SINGLE_FILE
    if single.exists():
        return read_safetensors_header(single)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = f" (found {', '.join(others)}: only safetensors are supported)" if others else ""
    raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} is present{hint}")


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> file name")
    return weight_map


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one safetensors file, from its JSON header alone.

    The format: an 8-byte little-endian header length, the JSON header, then the raw data; the
    data offsets are checked against the file size so a truncated download is caught here.
    """
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{file}: corrupt safetensors header (length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            end = int(entry["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}") from e
        if end > data_bytes:
            raise CheckpointError(
                f"{file}: tensor {name!r} ends at byte {end} but the file holds {data_bytes} "
                "bytes of data (truncated?)"
            )
        tensors[name] = TensorInfo(file, dtype, shape)
    return tensors
