"""What a server knows of one model it serves: its tokenizer, its limits, where it comes from.

Torch-free: the router reads it as well as the engine (it tokenizes for every mesh).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from muxserve.models.hf_config import HFModelConfig
from muxserve.tokenizer import Tokenizer


@dataclass(frozen=True)
class ServedModel:
    """A served model: name, checkpoint, architecture, tokenizer, serving dtype, context limit."""

    name: str
    path: Path
    config: HFModelConfig
    tokenizer: Tokenizer
    dtype: str
    max_model_len: int
