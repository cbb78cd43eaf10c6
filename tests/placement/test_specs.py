from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.errors import ConfigError
from muxserve.models.hf_config import load_hf_config
from placement.specs import load_models, spec_from_config
from tests.helpers.placement import CONFIGS, llama_config, spec


def llama_7b():
    return spec_from_config("a", "/x", load_hf_config(CONFIGS / "models" / "llama-7b"))


def test_llama_sizes_come_from_config_json() -> None:
    sizes = {
        n: load_hf_config(CONFIGS / "models" / f"llama-{n}").num_params()
        for n in ("7b", "13b", "30b", "65b")
    }
    assert sizes == {
        "7b": 6_738_415_616,
        "13b": 13_015_864_320,
        "30b": 32_528_943_616,
        "65b": 65_285_660_672,
    }


def test_7b_bytes_and_flops() -> None:
    s = llama_7b()
    assert s.dtype == "float16"
    assert s.weight_bytes == 2 * 6_738_415_616
    assert s.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2  # 512 KiB
    # 2 FLOPs per weight multiply-add (the embedding lookup is free), plus attention
    assert s.flops_per_token(0) == 2.0 * (6_738_415_616 - 32000 * 4096)
    assert s.flops_per_token(100) - s.flops_per_token(0) == 4.0 * 32 * 4096 * 100


def test_supports_tp_needs_heads_to_split() -> None:
    s30 = spec_from_config("b", "/x", load_hf_config(CONFIGS / "models" / "llama-30b"))
    assert [t for t in (1, 2, 4, 8) if s30.supports_tp(t)] == [1, 2, 4]  # 52 heads
    assert spec(heads=8, kv_heads=2).supports_tp(4) is False


def test_arch_key_ignores_the_name() -> None:
    assert spec("x").arch_key == spec("y").arch_key
    assert spec("x").arch_key != spec("x", layers=5).arch_key


def write_model(folder: Path, **kw: int) -> None:
    import json

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config(**kw)))


def test_load_models_resolves_paths_against_the_file(tmp_path: Path) -> None:
    write_model(tmp_path / "ckpt" / "small")
    f = tmp_path / "models.yaml"
    f.write_text(
        "models:\n"
        "  - {name: a, path: ckpt/small}\n"
        "  - {name: b, path: ckpt/small, dtype: bfloat16}\n"
    )
    ms = load_models(f)
    assert [e.path for e in ms.entries] == [str(tmp_path / "ckpt" / "small")] * 2
    assert [s.dtype for s in ms.specs] == ["float16", "bfloat16"]
    assert ms.engine_is_default


def test_a_cpu_engine_is_planned_in_float32(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    f = tmp_path / "models.yaml"
    f.write_text(
        "models: [{name: a, path: m}, {name: b, path: m, dtype: bfloat16}]\nengine: {device: cpu}\n"
    )
    assert [s.dtype for s in load_models(f).specs] == ["float32", "bfloat16"]


def test_engine_section_is_kept(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    f = tmp_path / "models.yaml"
    f.write_text("models: [{name: a, path: m}]\nengine: {max_batch_size: 64}\n")
    ms = load_models(f)
    assert ms.engine.max_batch_size == 64 and not ms.engine_is_default


def test_missing_config_json_names_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  - {name: a, path: empty}\n")
    with pytest.raises(
        ConfigError, match=r"models\.yaml: models\.0\.path: .*empty/config\.json: no config\.json"
    ):
        load_models(f)


def test_bad_config_key_names_it(tmp_path: Path) -> None:
    write_model(tmp_path / "m", layers=4)
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 4', '"num_hidden_layers": 0'))
    f = tmp_path / "models.yaml"
    f.write_text("models: [{name: a, path: m}]\n")
    with pytest.raises(
        ConfigError, match=r"models\.0\.path: .*'num_hidden_layers' must be a positive"
    ):
        load_models(f)


def test_models_file_errors(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("models: [{name: a, path: x, rate: -1}]\n")
    with pytest.raises(
        ConfigError, match=r"models\.yaml: models\.0\.rate: Input should be greater than 0"
    ):
        load_models(f)
    write_model(tmp_path / "x")
    f.write_text("models: [{name: a, path: x}, {name: a, path: x}]\n")
    with pytest.raises(ConfigError, match="duplicate model names: a"):
        load_models(f)


def test_paper_models_file() -> None:
    ms = load_models(CONFIGS / "models" / "paper-19.yaml")
    counts: dict[int, int] = {}
    for s in ms.specs:
        counts[s.config.num_layers] = counts.get(s.config.num_layers, 0) + 1
    assert counts == {32: 12, 40: 4, 60: 2, 80: 1}  # 12 × 7B, 4 × 13B, 2 × 30B, 1 × 65B
