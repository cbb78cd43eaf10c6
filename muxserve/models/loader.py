"""Checking and loading Hugging Face checkpoints: safetensors (one file, or shards plus an
index) or PyTorch `.bin` (the same two layouts).

`validate_checkpoint` reads `config.json` and the tensors' names, dtypes and shapes only (the
safetensors headers; a `.bin` memory-mapped, its data untouched), so the engine can check
every model it is asked to serve before it allocates anything; `load_model` then builds the
family's model (`muxserve.models.registry`) without initialising weights and fills it file by
file. Where a folder holds both formats, safetensors wins.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from muxserve.dtypes import DTYPE_BYTES, torch_dtype
from muxserve.errors import CheckpointError
from muxserve.models.causal_lm import CausalLM
from muxserve.models.hf_config import HFModelConfig, load_hf_config
from muxserve.models.registry import build_model, checkpoint_shapes
from muxserve.models.stacked import bind_stacks, stacked_tensors
from muxserve.models.weight_arena import column_major_weights, materialize_in_arena

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"

# safetensors dtype names we can cast from; quantized formats are not supported
LOADABLE_DTYPES = ("F64", "F32", "BF16", "F16")
MODEL_DTYPES = tuple(torch_dtype(name) for name in DTYPE_BYTES)
# a .bin tensor's dtype, named as safetensors names it
_TORCH_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # a larger header means a corrupt file


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint file says about one tensor."""

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

    Reads `config.json` and the tensors' names, dtypes and shapes only (no tensor data). Raises
    `CheckpointError` (`UnsupportedArchitectureError` for an unknown family) naming the folder and
    the first missing, unexpected or wrong-shaped tensor, or the missing file.
    """
    return plan_checkpoint(path).config


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    max_model_len: int | None = None,
) -> tuple[CausalLM, HFModelConfig]:
    """Build the model for a checkpoint folder and load its weights, cast to `dtype`, on `device`.

    Parameters are created on the meta device and allocated once, directly in `dtype` on
    `device` (on the CPU in one mapping advised into huge pages, the tall matrices
    column-major: `weight_arena`); each file is
    memory-mapped and copied in tensor by tensor, so peak extra memory is one tensor (a `.bin`
    saved in torch's legacy, non-zip format is read whole). The model is returned in eval mode
    with gradients off, its RoPE tables built for `max_model_len` positions (the served
    context; default the config's `max_position_embeddings`).
    """
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"model dtype must be one of {MODEL_DTYPES}, got {dtype}")
    device = torch.device(device)
    plan = plan_checkpoint(path)
    with torch.device("meta"):
        model = build_model(plan.config)
    model = model.to(dtype=dtype)  # (on meta: costs nothing)
    if device.type == "cpu":
        place_on_cpu(model)
    else:
        model = model.to_empty(device=device)
    model.load_weights(_tensors(plan))
    model.eval()
    model.requires_grad_(False)
    model.build_rope_cache(device, max_model_len)
    return model, plan.config


def place_on_cpu(model: CausalLM) -> None:
    """Give a model built on the meta device its CPU memory, laid out for decoding
    (`weight_arena`): the LM head skewed, tall matrices column-major, each stack of linears
    (`stacked`) back to back, each stack bound to its one matrix. Uninitialised, as
    `Module.to_empty` leaves it."""
    head, stacks = model.head_weight(), stacked_tensors(model)
    materialize_in_arena(
        model,
        skewed=(head,),
        column_major=column_major_weights(model, head, stacks),
        stacks=stacks,
    )
    bind_stacks(model)


def _tensors(plan: CheckpointPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Every planned tensor with its name, file by file, each read only when asked for."""
    for file, names in plan.shards.items():
        if file.name.endswith(".safetensors"):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        else:
            state = _load_bin(file)
            for name in names:
                yield name, state[name]
            del state


def plan_checkpoint(path: str | Path) -> CheckpointPlan:
    """`validate_checkpoint`, also returning which tensors to read from which file."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: not a checkpoint folder (a Hugging Face model id in a config's `path` "
            "is looked up in the Hub cache when the config is read)"
        )
    config = load_hf_config(folder)
    found = _read_headers(folder)
    expected = checkpoint_shapes(config)

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
    """All tensors of the checkpoint, by name, from its safetensors headers, or from its
    `.bin` files memory-mapped (their data untouched)."""
    for index_name, single_name, read in (
        (INDEX_FILE, SINGLE_FILE, read_safetensors_header),
        (BIN_INDEX_FILE, BIN_FILE, read_bin_header),
    ):
        index = folder / index_name
        if index.exists():
            return _read_sharded(folder, index, read)
        single = folder / single_name
        if single.exists():
            return read(single)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = f" (found {', '.join(others)})" if others else ""
    raise CheckpointError(
        f"{folder}: none of {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE}, {BIN_INDEX_FILE} "
        f"is present{hint}"
    )


def _read_sharded(
    folder: Path, index: Path, read: Callable[[Path], dict[str, TensorInfo]]
) -> dict[str, TensorInfo]:
    weight_map = _read_index(index)
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    found: dict[str, TensorInfo] = {}
    for file_name, names in by_file.items():
        file = _shard_in(folder, index, file_name)
        if not file.exists():
            raise CheckpointError(
                f"{folder}: shard {file_name} listed in {index.name} is missing "
                f"(it should hold {names[0]!r} and {len(names) - 1} more tensors)"
            )
        header = read(file)
        for name in names:
            if name not in header:
                raise CheckpointError(
                    f"{folder}: {index.name} puts tensor {name!r} in {file_name}, "
                    "but that file does not hold it"
                )
            found[name] = header[name]
    return found


def _shard_in(folder: Path, index: Path, file_name: str) -> Path:
    """The shard an index names, refused unless it lies in the model folder: the name may not
    leave it (`..`, an absolute path), nor may the file once symlinks are resolved (a file of
    a Hugging Face cache snapshot links into the repo's `blobs/`, which is allowed)."""
    file = folder / file_name
    root = folder.resolve()
    if root.parent.name == "snapshots":  # <cache>/models--owner--name/snapshots/<revision>
        root = root.parent.parent
    target = file.resolve()
    named = Path(os.path.normpath(file_name))
    if named.is_absolute() or named.parts[:1] == ("..",) or not target.is_relative_to(root):
        raise CheckpointError(
            f"{folder}: {index.name} names shard {file_name!r}, which is {target}, outside the "
            "model folder; refusing to open it"
        )
    return file


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped where torch allows (its zip format), tensors only."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # a truncated zip, a pickle that is not a plain state dict, ...
        raise CheckpointError(f"{file}: not a readable PyTorch weights file ({e})") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file}: expected a state dict of tensor name -> tensor")
    return state


def read_bin_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one `.bin` file (memory-mapped, data not read)."""
    return {
        name: TensorInfo(file, _TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        for name, t in _load_bin(file).items()
    }


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
