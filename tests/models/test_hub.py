"""Hugging Face model ids as `path`: resolved through a Hub cache laid out here, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from muxserve.config import parse_config
from muxserve.engine import MuxEngine
from muxserve.errors import ConfigError
from muxserve.models.hub import is_hub_id, resolve_checkpoint
from muxserve.models.loader import validate_checkpoint
from muxserve.sampling_params import SamplingParams

MAIN = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_cache(tmp_path: Path, zoo_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """`$HF_HOME/hub` holding `org/tiny-qwen3` at `main` and `org/tiny-gemma2` at tag `v1`,
    as huggingface_hub lays a cache out (refs name snapshots), offline."""
    home = tmp_path / "hf-home"
    for repo, ref, sha, model in (
        ("tiny-qwen3", "main", MAIN, "qwen3-zoo"),
        ("tiny-gemma2", "v1", TAGGED, "gemma2-zoo"),
    ):
        root = home / "hub" / f"models--org--{repo}"
        shutil.copytree(zoo_models[model], root / "snapshots" / sha)
        (root / "refs").mkdir()
        (root / "refs" / ref).write_text(sha)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


def entry(path: str, **fields: object) -> dict[str, object]:
    return {"models": [{"name": "m", "path": path, **fields}]}


def test_what_counts_as_an_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)
    assert is_hub_id("Qwen/Qwen3-8B") and is_hub_id("google/gemma-2-9b-it")
    assert not is_hub_id("local/model")  # a folder by that name wins
    assert not is_hub_id("/abs/Qwen3-8B") and not is_hub_id("a/b/c") and not is_hub_id("../x")
    assert resolve_checkpoint("/no/such/folder") == "/no/such/folder"  # left to the loader


def test_an_id_resolves_to_its_cached_snapshot(hub_cache: Path) -> None:
    config = parse_config(entry("org/tiny-qwen3"))
    snapshot = hub_cache / "models--org--tiny-qwen3" / "snapshots" / MAIN
    assert config.models[0].path == str(snapshot)
    assert validate_checkpoint(config.models[0].path).architecture == "Qwen3ForCausalLM"


def test_a_revision_picks_its_snapshot(hub_cache: Path) -> None:
    config = parse_config(entry("org/tiny-gemma2", revision="v1"))
    assert config.models[0].path == str(hub_cache / "models--org--tiny-gemma2/snapshots" / TAGGED)
    with pytest.raises(
        ConfigError, match=r"revision 'main' of Hugging Face model 'org/tiny-gemma2'"
    ):
        parse_config(entry("org/tiny-gemma2", revision="main"))


def test_the_engine_serves_a_model_by_its_id(hub_cache: Path) -> None:
    engine = MuxEngine(
        parse_config(entry("org/tiny-qwen3") | {"engine": {"kv_pool_bytes": 1 << 20}})
    )
    [out] = engine.generate([[11, 12, 13]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out.token_ids) == 4


def test_an_uncached_id_offline_names_the_id_and_the_cache(hub_cache: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(entry("org/not-there"), source="serve.yaml")
    message = str(info.value)
    assert message.startswith("serve.yaml: models.0: ")
    assert f"Hugging Face model 'org/not-there' is not in the cache ({hub_cache}) and " in message
    assert "HF_HUB_OFFLINE is set" in message


def test_an_unreachable_hub_falls_back_to_the_cache(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online but the Hub refuses connections: cached ids still resolve, others say so."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    config = parse_config(entry("org/tiny-qwen3"))
    assert config.models[0].path.endswith(MAIN)
    with pytest.raises(ConfigError, match="the Hub could not be reached or refused it"):
        parse_config(entry("org/not-there"))
