"""What is allocated per position follows the served context (max_model_len), not the
max_position_embeddings a config.json claims."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest

from muxserve.config import MuxConfig, parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.errors import ConfigError
from muxserve.model_descriptor import MAX_SERVED_CONTEXT, served_context
from muxserve.models.hf_config import load_hf_config
from muxserve.sampling_params import SamplingParams

HUGE = 10**8  # positions the config claims: its RoPE tables alone would be ~13 GB


def claiming(demo_models: dict[str, Path], tmp_path: Path, positions: int) -> Path:
    """llama-demo, its config.json saying `positions` max_position_embeddings."""
    folder = shutil.copytree(demo_models["llama-demo"], tmp_path / "llama-huge")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"max_position_embeddings": positions}))
    return folder


def config_for(folder: Path, **model: object) -> MuxConfig:
    return parse_config(
        {"models": [{"name": "llama-huge", "path": str(folder), **model}], "engine": DEMO_ENGINE}
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_a_config_claiming_1e8_positions_serves_under_max_model_len(demo_models, tmp_path):
    folder = claiming(demo_models, tmp_path, HUGE)
    before = peak_rss_bytes()
    with MuxEngine(config_for(folder, max_model_len=256)) as engine:
        assert engine.models["llama-huge"].max_model_len == 256
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        (out,) = engine.generate(["Once upon a time"], params, "llama-huge")
    assert len(out.token_ids) == 8
    assert peak_rss_bytes() - before < 1 << 30  # tables for 256 positions, not 10^8


def test_without_a_cap_it_is_refused_naming_both_keys(demo_models, tmp_path):
    folder = claiming(demo_models, tmp_path, HUGE)
    with pytest.raises(ConfigError) as info:
        MuxEngine(config_for(folder))
    assert str(info.value) == (
        "llama-huge: config.json's max_position_embeddings is 100000000 and max_model_len is "
        "not set: more than the 16777216 positions served at most (buffers are sized by "
        "them); set max_model_len (the model's, or engine.max_model_len) to the context to serve"
    )


def test_served_context_is_one_rule(demo_models, tmp_path):
    hf = load_hf_config(claiming(demo_models, tmp_path, HUGE))
    assert served_context("m", hf, (None, 4096)) == 4096
    assert served_context("m", hf, (2048, 4096)) == 2048
    with pytest.raises(ConfigError, match=r"m: config.json's max_position_embeddings is 100000000"):
        served_context("m", hf, (None, None))
    assert MAX_SERVED_CONTEXT < HUGE
