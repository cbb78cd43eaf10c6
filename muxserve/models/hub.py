"""Hugging Face model ids as checkpoint paths: `path: Qwen/Qwen3-8B` is the id's snapshot in the
Hugging Face cache.

A config's `path` that is not a local file or folder and looks like `owner/name` is resolved
once, when the config is read, to the snapshot folder `huggingface_hub.snapshot_download`
gives: `HF_HOME` / `HF_HUB_CACHE` say where the cache is, `HF_HUB_OFFLINE=1` never asks the
Hub, `revision` picks a branch, tag or commit. Online, only what serving needs is fetched
(config, tokenizer, safetensors weights; `.bin` weights only where a repo has no
safetensors). Where the id is not cached and the Hub cannot be reached, the error names the id
and the cache folder. Torch-free.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from muxserve.errors import CheckpointError

# what serving reads from a repo: never its original/ consolidated weights, GGUF, ONNX, ...
SERVING_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
BIN_FILES = ["*.bin"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = ("1", "true", "yes", "on")


def is_hub_id(path: str) -> bool:
    """Whether `path` names a Hub repo rather than a local file or folder."""
    return bool(_HUB_ID.fullmatch(path)) and ".." not in path and not Path(path).exists()


def hub_cache_dir() -> Path:
    """The Hugging Face cache, read from the environment now (not when huggingface_hub was
    imported): `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve_checkpoint(path: str, revision: str | None = None) -> str:
    """`path` itself when it is local (or not an id); else the id's snapshot folder."""
    if not is_hub_id(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # a dependency, but say what is missing if it is not there
        raise CheckpointError(f"{path}: a Hub model id needs huggingface_hub ({e})") from e
    cache = hub_cache_dir()
    where = f"revision {revision!r} of " if revision else ""
    try:
        folder = Path(
            snapshot_download(
                path,
                revision=revision,
                cache_dir=cache,
                local_files_only=offline(),
                allow_patterns=SERVING_FILES,
            )
        )
        if not any(folder.glob("*.safetensors")):
            folder = Path(
                snapshot_download(
                    path,
                    revision=revision,
                    cache_dir=cache,
                    local_files_only=offline(),
                    allow_patterns=SERVING_FILES + BIN_FILES,
                )
            )
    except Exception as e:  # huggingface_hub raises several kinds: each means "not available"
        how = "HF_HUB_OFFLINE is set" if offline() else "the Hub could not be reached or refused it"
        raise CheckpointError(
            f"{where}Hugging Face model {path!r} is not in the cache ({cache}) and {how}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(download it where there is network, e.g. `hf download " + path + "`, "
            "or set `path` to a local folder)"
        ) from e
    return str(folder)
