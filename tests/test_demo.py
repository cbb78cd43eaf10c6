"""Demo models: HF layout and loading, the specified shapes, determinism, usable outputs."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from muxserve import demo
from muxserve.config import load_config
from muxserve.models.hf_config import load_hf_config

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    demo.STAMP_FILE,
}
# sha256 of model.safetensors: the same on every machine (seeded CPU generator, fixed layout)
WEIGHT_SHA256 = {
    "llama-demo": "ddb0f7bd529ca390901fcf71a77136facd6d2ba4bf58f66c810e6ea552bf4267",
    "qwen-demo": "e93c4d5b7cb0df9af9cd95026dcc412eea59235838b50f794f867741342d870a",
    "mistral-demo": "2abfbd518da5947358bdd53809993633d41e546d9fb42fddb99ab42b2fc53482",
}


def digests(folder: Path) -> dict[str, str]:
    return {
        f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*/*"))
    }


@pytest.fixture(scope="module")
def hf_models(demo_models: dict[str, Path]) -> dict[str, Any]:
    return {
        name: transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        for name, folder in demo_models.items()
    }


def test_names_and_layout(demo_models: dict[str, Path]) -> None:
    assert (
        tuple(demo_models) == demo.DEMO_MODEL_NAMES == ("llama-demo", "qwen-demo", "mistral-demo")
    )
    for name, folder in demo_models.items():
        present = {p.name for p in folder.iterdir()}
        expected = FILES | ({"chat_template.jinja"} if name == "mistral-demo" else set())
        assert present == expected, name


@pytest.mark.parametrize("name", demo.DEMO_MODEL_NAMES)
def test_loads_in_transformers_with_every_key(demo_models: dict[str, Path], name: str) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        demo_models[name], output_loading_info=True
    )
    assert model.dtype == torch.float32
    assert (
        type(model).__name__
        == json.loads((demo_models[name] / "config.json").read_text())["architectures"][0]
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]


def test_architectures_differ_as_specified(demo_models: dict[str, Path]) -> None:
    llama, qwen, mistral = (load_hf_config(demo_models[n]) for n in demo.DEMO_MODEL_NAMES)

    assert llama.architecture == "LlamaForCausalLM"
    assert llama.num_kv_heads == llama.num_heads == 4  # MHA
    assert (llama.hidden_size, llama.num_layers, llama.head_dim) == (128, 2, 32)
    assert not llama.tie_word_embeddings and not llama.qkv_bias
    assert llama.rope_scaling == {"rope_type": "linear", "factor": 2.0}

    assert qwen.architecture == "Qwen2ForCausalLM"
    assert (qwen.num_heads, qwen.num_kv_heads, qwen.num_layers, qwen.head_dim) == (8, 2, 3, 16)
    assert qwen.qkv_bias and qwen.tie_word_embeddings
    assert qwen.layer_sliding_windows == (None,) * 3

    assert mistral.architecture == "MistralForCausalLM"
    assert mistral.head_dim == 64 != mistral.hidden_size // mistral.num_heads
    assert (mistral.num_heads, mistral.num_kv_heads, mistral.num_layers) == (4, 1, 4)
    windows = mistral.layer_sliding_windows
    assert len(windows) == 4
    assert all(w is not None and w > mistral.max_position_embeddings for w in windows)

    for cfg in (llama, qwen, mistral):
        assert cfg.vocab_size == 1024 and cfg.max_position_embeddings == 1024
        assert cfg.torch_dtype == "float32"
        assert cfg.bos_token_id == 0 and cfg.eos_token_ids == (1,)
    assert len({c.head_dim for c in (llama, qwen, mistral)}) == 3
    assert len({c.num_layers for c in (llama, qwen, mistral)}) == 3


@pytest.mark.parametrize("name", demo.DEMO_MODEL_NAMES)
def test_tensor_names_and_shapes(demo_models: dict[str, Path], name: str) -> None:
    cfg = load_hf_config(demo_models[name])
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if cfg.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
    with safe_open(demo_models[name] / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        found = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert {k: tuple(t.shape) for k, t in found.items()} == shapes
    assert all(t.dtype == torch.float32 for t in found.values())
    for key, t in found.items():
        if key.endswith("norm.weight"):
            assert t.min() > 0.5 and t.max() < 1.5 and abs(t.mean() - 1) < 0.05, key


def test_build_is_deterministic(tmp_path: Path, demo_models: dict[str, Path]) -> None:
    a = demo.ensure_demo_models(tmp_path / "a")
    b = demo.ensure_demo_models(tmp_path / "b")
    assert set(a) == set(b) == set(demo.DEMO_MODEL_NAMES)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    for name in demo.DEMO_MODEL_NAMES:
        weights = (tmp_path / "a" / name / "model.safetensors").read_bytes()
        assert hashlib.sha256(weights).hexdigest() == WEIGHT_SHA256[name], name
    # the shared cache was built by this code: else demo.DEMO_VERSION needs a bump
    assert digests(next(iter(demo_models.values())).parent) == digests(tmp_path / "a")


def test_skips_complete_models_and_rebuilds_stale_ones(tmp_path: Path) -> None:
    folders = demo.ensure_demo_models(tmp_path)
    (tmp_path / "junk").mkdir()  # other folders are left alone
    weights = folders["qwen-demo"] / "model.safetensors"
    weights.write_bytes(b"left alone: the folder is complete")
    (folders["llama-demo"] / demo.STAMP_FILE).write_text('{"demo_version": 0}')  # stale
    (folders["mistral-demo"] / demo.STAMP_FILE).unlink()  # interrupted by hand
    demo.ensure_demo_models(tmp_path)
    assert weights.read_bytes() == b"left alone: the folder is complete"
    for name in ("llama-demo", "mistral-demo"):
        stamp = json.loads((folders[name] / demo.STAMP_FILE).read_text())
        assert stamp["demo_version"] == demo.DEMO_VERSION
    demo.ensure_demo_models(tmp_path, force=True)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == WEIGHT_SHA256["qwen-demo"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*demo.DEMO_MODEL_NAMES, "junk"])


def make_models(*argv: str) -> int:
    """`muxserve make-models ARGV` (its own parser: the CLI imports every subcommand)."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return demo.run(parser.parse_args(argv))


def test_cli_make_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert make_models("--out", str(tmp_path / "x")) == 0
    assert f"llama-demo: {tmp_path / 'x' / 'llama-demo'}" in capsys.readouterr().out
    monkeypatch.setenv("MUXSERVE_CACHE", str(tmp_path / "cache"))
    assert make_models() == 0
    assert (tmp_path / "cache" / "demo-models" / "qwen-demo" / "model.safetensors").is_file()
    assert make_models("--force") == 0
    assert digests(tmp_path / "x") == digests(tmp_path / "cache" / "demo-models")


def test_demo_yaml_is_the_default_config(demo_models: dict[str, Path]) -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    assert {m.name: Path(m.path) for m in config.models} == demo_models
    assert [m.rate for m in config.models] == [3.0, 2.0, 1.0]
    assert config.engine.kv_pool_bytes == 8 << 20 and config.engine.block_bytes == 4096
    assert config == demo.default_config(next(iter(demo_models.values())).parent, progress=False)


@pytest.mark.parametrize("name", demo.DEMO_MODEL_NAMES)
def test_greedy_generation_is_varied_and_decisive(
    demo_models: dict[str, Path], hf_models: dict[str, Any], name: str
) -> None:
    """HF greedy output is not one token repeated, and top-1 beats top-2 by a clear margin."""
    model = hf_models[name]
    tok = transformers.AutoTokenizer.from_pretrained(demo_models[name])
    margins = []
    for prompt in ("The river ran quietly", "中文：今天", "Hello"):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=2
            )
            logits = model(out).logits[0, ids.shape[1] - 1 :]
        new = out[0, ids.shape[1] :].tolist()
        assert len(set(new)) >= 4, (prompt, new)
        top2 = logits.topk(2, dim=-1).values
        margins += (top2[:, 0] - top2[:, 1]).tolist()
    margins_t = torch.tensor(margins)
    assert (margins_t > 1e-3).float().mean() >= 0.95
    assert margins_t.median() > 0.05
