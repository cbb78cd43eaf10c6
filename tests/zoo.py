"""A zoo of tiny random checkpoints, one per model family, written with transformers itself.

Each is a real Hugging Face checkpoint folder (config.json, weights, the demo models' tokenizer
files), 2 layers of hidden size 64, so the engine and the HTTP server can serve them and
transformers can be the reference. They are built once into `$MUXSERVE_CACHE/zoo-models` (as
the demo models are) and rebuilt only when `ZOO_VERSION` or the transformers version changes.
Weights come from `torch.manual_seed`, with norms and biases randomised too (HF initialises
them to constants, which would hide a missing scale), and an init range that gives logits of a
few units, so greedy parity is not decided by float noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from muxserve.config import default_cache_dir
from muxserve.demo import BOS, CHAT_TEMPLATE, END, EOS, PAD, SPECIAL_TOKENS, build_tokenizer

ZOO_VERSION = 1
STAMP_FILE = ".muxserve-zoo.json"

# shared by all: 2 layers, hidden 64, 4 query heads of 16 over 2 KV heads
_SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "initializer_range": 0.15,
    "tie_word_embeddings": False,
}

# name -> (transformers config class, model class, config fields); one of each family
ZOO: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3-zoo": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2-zoo": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # layer 0 slides over 8 tokens; attention (50) and final (30) soft-caps by default;
        # query_pre_attn_scalar 256 (not head_dim), tied embeddings scaled by sqrt(64)
        {"sliding_window": 8, "tie_word_embeddings": True, "initializer_range": 0.1},
    ),
    "gemma3-zoo": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            "query_pre_attn_scalar": 32,
            "tie_word_embeddings": True,
            "initializer_range": 0.1,
        },
    ),
    "phi3-zoo": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            # longrope over 3/4 of each head: 12 rotated dims, 6 factors each; the long factors
            # take over past position 32
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 32,
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            },
            "sliding_window": 24,
            "pad_token_id": 2,
        },
    ),
    "mixtral-zoo": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3-moe-zoo": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        # layer 1 keeps a dense MLP; top-2 of 4 experts of width 64, renormalised
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
}
ZOO_NAMES = tuple(ZOO)


def zoo_dir() -> Path:
    return default_cache_dir() / "zoo-models"


def ensure_zoo_models(out: Path | None = None) -> dict[str, Path]:
    """Build the zoo under `out` unless already there; return name -> folder."""
    import transformers

    root = (out or zoo_dir()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    stamp = {"zoo_version": ZOO_VERSION, "transformers": transformers.__version__}
    folders = {name: root / name for name in ZOO_NAMES}
    todo = [n for n in ZOO_NAMES if _stamp(folders[n]) != stamp | {"name": n}]
    if todo:
        tokenizer = build_tokenizer()
        for name in todo:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                write_zoo_model(tmp, name, tokenizer)
                (tmp / STAMP_FILE).write_text(json.dumps(stamp | {"name": name}))
                shutil.rmtree(folders[name], ignore_errors=True)
                os.rename(tmp, folders[name])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folders


def hf_config(name: str, vocab_size: int, **overrides: Any) -> Any:
    """The transformers config of zoo model `name`."""
    import transformers

    config_cls, _, fields = ZOO[name]
    ids = {t: SPECIAL_TOKENS.index(t) for t in (BOS, EOS, PAD)}
    return getattr(transformers, config_cls)(
        **{
            **_SMALL,
            "vocab_size": vocab_size,
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
            "pad_token_id": ids[PAD],
            **fields,
            **overrides,
        }
    )


def random_model(name: str, config: Any, seed: int = 0) -> Any:
    """The transformers model of `name` for `config`, seeded, norms and biases randomised."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, ZOO[name][1])(config)
    gemma = "gemma" in name  # Gemma's norms scale by 1 + w: randomise around 0, not 1
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def write_zoo_model(folder: Path, name: str, tokenizer: Any) -> None:
    """One complete checkpoint: weights and config by transformers, our tokenizer files."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    model = random_model(name, hf_config(name, vocab), seed=ZOO_NAMES.index(name))
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[END]], "pad_token_id": ids[PAD]},
    )


def _stamp(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
