"""Tiny random HF checkpoints made with transformers itself, and HF reference logits."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96

# a small model of each family; tests override single fields
BASE: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32,
        "initializer_range": 0.2,  # logits of a few units, so a 1e-4 tolerance means something
    },
}
BASE["qwen2"] = {**BASE["llama"], "num_key_value_heads": 2, "tie_word_embeddings": True}
BASE["mistral"] = {**BASE["llama"], "num_key_value_heads": 2, "sliding_window": 4}

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}

MakeCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> MakeCheckpoint:
    """`make_checkpoint(family, max_shard_size=None, **config)` -> a saved checkpoint folder.

    Weights come from `torch.manual_seed(0)`; norms and biases are randomised too (HF initialises
    them to ones and zeros, which would hide a missing scale or bias). Folders are cached per
    arguments for the session.
    """
    made: dict[str, Path] = {}

    def make(family: str, max_shard_size: str | None = None, **overrides: Any) -> Path:
        key = json.dumps([family, max_shard_size, overrides], sort_keys=True)
        if key in made:
            return made[key]
        config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
        config = config_cls(**{**BASE[family], **overrides})
        torch.manual_seed(0)
        model = model_cls(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
        folder = tmp_path_factory.mktemp(family)
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
        made[key] = folder
        return folder

    return make


def _hf_logits(
    folder: Path,
    ids: torch.Tensor,
    offsets: Sequence[int],
    lengths: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """HF's logits (eager attention) for packed sequences, run one sequence at a time.

    Sequence i is `ids[start_i : start_i + lengths[i]]` at positions `offsets[i]` onwards.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager"
    ).eval()
    outs = []
    with torch.no_grad():
        for seq, offset in zip(ids.split(list(lengths)), offsets, strict=True):
            positions = torch.arange(offset, offset + len(seq))
            outs.append(model(seq[None], position_ids=positions[None]).logits[0].float())
    return torch.cat(outs)


def _packed_positions(offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """(T,) positions of sequences packed back to back, each from its own offset."""
    return torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lengths, strict=True)]).long()


@pytest.fixture(scope="session")
def hf_logits() -> Callable[..., torch.Tensor]:
    """The `_hf_logits` helper, as a fixture so test modules need not import conftest."""
    return _hf_logits


@pytest.fixture(scope="session")
def packed_positions() -> Callable[..., torch.Tensor]:
    """The `_packed_positions` helper."""
    return _packed_positions


MakeFamily = Callable[..., Path]


@pytest.fixture(scope="session")
def make_family(tmp_path_factory: pytest.TempPathFactory) -> MakeFamily:
    """`make_family(zoo_name, **config)` -> a saved checkpoint of that zoo family (2 layers,
    hidden 64, vocab VOCAB), with config fields overridden; cached per arguments."""
    import zoo

    made: dict[str, Path] = {}

    def make(name: str, **overrides: Any) -> Path:
        key = json.dumps([name, overrides], sort_keys=True)
        if key not in made:
            model = zoo.random_model(name, zoo.hf_config(name, VOCAB, **overrides))
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def zoo_models() -> dict[str, Path]:
    """The zoo (one tiny checkpoint per family, with tokenizer), built once into the cache."""
    import zoo

    return zoo.ensure_zoo_models()
