"""`muxserve make-models`: three small random-weight checkpoints in the Hugging Face layout.

Tests, `configs/demo.yaml` and the CPU demo serve these instead of downloading real models. The
three differ where serving code can go wrong: multi-head vs grouped-query attention, q/k/v bias,
tied embeddings, a head size that is not hidden/heads, layer counts, RoPE settings. The weights
are seeded, so the same command writes bit-identical files on any machine, and scaled so that
greedy generation varies and its top-1 logit is clearly ahead (parity tests are not decided by
float noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend
from tqdm import tqdm

from muxserve.config import MuxConfig, default_cache_dir, parse_config
from muxserve.demo_corpus import DEMO_CORPUS
from muxserve.errors import CheckpointError

DEMO_MODEL_NAMES = ("llama-demo", "qwen-demo", "mistral-demo")
DEMO_VERSION = 2  # bump whenever what is written changes: older caches are then rebuilt
STAMP_FILE = ".muxserve-demo.json"  # written last; a folder without the right one is rebuilt

VOCAB_SIZE = 1024  # target of the BPE trainer (the corpus is large enough to reach it)
MAX_POSITIONS = 1024
# What configs/demo.yaml says too (a test keeps them equal): rates weight the initial KV quotas.
DEMO_RATES = {"llama-demo": 3.0, "qwen-demo": 2.0, "mistral-demo": 1.0}
DEMO_ENGINE: dict[str, Any] = {
    "kv_pool_bytes": 8 << 20,  # ~4k tokens of the largest demo model: plenty on a CPU
    "block_bytes": 4096,  # 8 to 32 tokens per block, by head size
    "prefill_token_budget": 512,
    "max_batch_size": 32,
}

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", END)  # ids 0..6

# Qwen2's (and, but for \p{N}{1,3}, Llama 3's) split before byte-level BPE. Our tokenizer.json
# uses it because transformers 5 rebuilds any qwen2 checkpoint's tokenizer with this split and
# NFC, whatever tokenizer.json says: with the same pipeline its ids match ours.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Each turn is `<|role|>\n{content}<|end|>\n`; `<|end|>` ends the assistant's turn, so it is an
# EOS id in generation_config.json next to <|eos|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ (message['content'] | trim) ~ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# name -> (seed, architecture-specific config.json keys)
_ARCH: dict[str, tuple[int, dict[str, Any]]] = {
    "llama-demo": (
        1001,
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,  # multi-head attention
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
        },
    ),
    "qwen-demo": (
        1002,
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 128,
            "intermediate_size": 320,
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,  # grouped-query attention, 4 queries per KV head
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 3,
            "tie_word_embeddings": True,  # no lm_head.weight in the file
        },
    ),
    "mistral-demo": (
        1003,
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": 192,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,  # multi-query attention
            "head_dim": 64,  # != 192 / 4
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "sliding_window": 4096,  # beyond max_position_embeddings: no effect
            "tie_word_embeddings": False,
        },
    ),
}


def default_demo_dir() -> Path:
    """Where demo models go by default: `$MUXSERVE_CACHE/demo-models`."""
    return default_cache_dir() / "demo-models"


def ensure_demo_models(
    out: Path | None = None, *, force: bool = False, progress: bool = False
) -> dict[str, Path]:
    """Build the demo models under `out` unless already there; return name -> folder.

    Each model is written to a temporary folder and renamed into place, so an interrupted or
    concurrent build never leaves a half model; complete ones are skipped unless `force`.
    """
    root = (out if out is not None else default_demo_dir()).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{root}: cannot create the demo models folder ({e})") from e
    folders = {name: root / name for name in DEMO_MODEL_NAMES}
    todo = [n for n in DEMO_MODEL_NAMES if force or not _is_complete(folders[n])]
    if not todo:
        return folders
    tokenizer = build_tokenizer()
    with tqdm(total=len(todo), desc="demo models", unit="model", disable=not progress) as bar:
        for name in todo:
            bar.set_postfix_str(name)
            _build_into(root, name, tokenizer, replace=force)
            bar.update()
    return folders


def default_config(out: Path | None = None, progress: bool = True) -> MuxConfig:
    """The config of configs/demo.yaml, with the demo models built first if need be."""
    folders = ensure_demo_models(out, progress=progress)
    models = [{"name": n, "path": str(p), "rate": DEMO_RATES[n]} for n, p in folders.items()]
    return parse_config({"models": models, "engine": DEMO_ENGINE}, source="demo config")


def build_tokenizer() -> _Backend:
    """Train the byte-level BPE tokenizer all demo models share, on the built-in corpus."""
    tok = _Backend(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DEMO_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))],
    )
    return tok


def model_config(name: str, vocab_size: int) -> dict[str, Any]:
    """The config.json of one demo model."""
    _, arch = _ARCH[name]
    ids = {t: SPECIAL_TOKENS.index(t) for t in (BOS, EOS, PAD)}
    return {
        **arch,
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def make_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 weights with Hugging Face names and shapes for a Llama-family config.

    Linear layers get std 1/sqrt(fan_in) so every layer changes the residual stream (the output
    depends on context, not only on the last token); the head is scaled for logits of std ~2.
    A tied head is the embedding, whose row for the current token sits in the residual stream
    and would win the argmax again and again: larger residual branches drown it out.
    """
    gen = torch.Generator().manual_seed(seed)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=in_f**-0.5)

    branch_gain = 4.0 if config["tie_word_embeddings"] else 1.0  # o_proj and down_proj

    def norm() -> torch.Tensor:
        return 1.0 + normal(h, std=0.1)

    w = {"model.embed_tokens.weight": normal(v, h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        for proj, out_f in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
            w[p + f"self_attn.{proj}_proj.weight"] = linear(out_f, h)
            if bias:
                w[p + f"self_attn.{proj}_proj.bias"] = normal(out_f, std=0.1)
        w[p + "self_attn.o_proj.weight"] = linear(h, heads * hd) * branch_gain
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(inter, h)
        w[p + "mlp.up_proj.weight"] = linear(inter, h)
        w[p + "mlp.down_proj.weight"] = linear(h, inter) * branch_gain
    w["model.norm.weight"] = norm()
    if config["tie_word_embeddings"]:
        w["model.embed_tokens.weight"] *= 2.0 * h**-0.5  # it is the head too: logits std ~2
    else:
        w["lm_head.weight"] = normal(v, h, std=2.0 * h**-0.5)
    return w


def write_model(folder: Path, name: str, tokenizer: _Backend) -> None:
    """Write one complete demo checkpoint (config, weights, tokenizer files) into `folder`."""
    seed, _ = _ARCH[name]
    config = model_config(name, tokenizer.get_vocab_size(with_added_tokens=True))
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    save_file(make_weights(config, seed), str(folder / "model.safetensors"), {"format": "pt"})
    _write_json(folder / "config.json", config)
    tokenizer.save(str(folder / "tokenizer.json"))
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,  # byte-level BPE has none (transformers' Qwen2 class would add one)
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
    }
    if name == "mistral-demo":  # the newer layout: the template in its own file
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    else:
        tok_config["chat_template"] = CHAT_TEMPLATE
    _write_json(folder / "tokenizer_config.json", tok_config)
    special_map: dict[str, Any] = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    special_map["additional_special_tokens"] = [
        t for t in SPECIAL_TOKENS if t not in special_map.values()
    ]
    _write_json(folder / "special_tokens_map.json", special_map)
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[END]], "pad_token_id": ids[PAD]},
    )
    _write_json(folder / STAMP_FILE, {"name": name, "demo_version": DEMO_VERSION})


# ---- CLI ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to write the models into (default: $MUXSERVE_CACHE/demo-models, "
        "with MUXSERVE_CACHE defaulting to ~/.cache/muxserve)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild models already there")


def run(args: argparse.Namespace) -> int:
    folders = ensure_demo_models(args.out, force=args.force, progress=True)
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


# ---- helpers -----------------------------------------------------------------------------------
def _is_complete(folder: Path) -> bool:
    """True when `folder` holds a demo model written by this DEMO_VERSION."""
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("demo_version") == DEMO_VERSION


def _build_into(root: Path, name: str, tokenizer: _Backend, replace: bool) -> None:
    """Write `name` to a temporary folder under `root`, then rename it to `root / name`."""
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write_model(tmp, name, tokenizer)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for file in tmp.iterdir():
            file.chmod(0o644)
        if final.exists() and (replace or not _is_complete(final)):
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # not a concurrent build that finished first
                raise
    except OSError as e:
        raise CheckpointError(f"{final}: cannot write demo model ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
