"""The YAML config: parsing, errors that name the file and the dotted key, paths, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.config import (
    EngineConfig,
    MuxConfig,
    SMShare,
    default_cache_dir,
    dump_config,
    load_config,
    parse_config,
)
from muxserve.errors import ConfigError


def good() -> dict:
    return {
        "models": [
            {
                "name": "llama",
                "path": "/models/llama",
                "dtype": "bfloat16",
                "rate": 2.5,
                "max_model_len": 2048,
                "sm_share": {"prefill": 0.6, "decode": 0.3},
                "max_waiting": 8,
            },
            {"name": "qwen", "path": "/models/qwen"},
        ],
        "engine": {
            "kv_pool_bytes": 1 << 20,
            "block_bytes": 4096,
            "policy": "fcfs",
            "kv_mode": "static",
            "prefill_token_budget": 512,
            "seed": 7,
            "executor": "mps",  # the plan runs llama at tensor_parallel=2
        },
        "meshes": [
            {
                "name": "m0",
                "gpus": [0, 1],
                "models": [{"name": "llama", "tensor_parallel": 2, "kv_share": 0.75, "rate": 2.0}],
            },
            {"name": "m1", "gpus": [2], "models": [{"name": "qwen"}]},
        ],
    }


def test_parse_good_config() -> None:
    cfg = parse_config(good())
    llama, qwen = cfg.models
    assert (llama.name, llama.path, llama.dtype, llama.rate) == (
        "llama",
        "/models/llama",
        "bfloat16",
        2.5,
    )
    assert (llama.max_model_len, llama.max_waiting, llama.tensor_parallel) == (2048, 8, 1)
    assert llama.sm_share == SMShare(prefill=0.6, decode=0.3)
    assert (qwen.dtype, qwen.rate, qwen.max_model_len, qwen.max_waiting) == (None, 1.0, None, 1024)
    assert qwen.sm_share == SMShare(prefill=1.0, decode=1.0)
    e = cfg.engine
    assert (e.kv_pool_bytes, e.block_bytes, e.policy, e.kv_mode) == (
        1 << 20,
        4096,
        "fcfs",
        "static",
    )
    assert (e.prefill_token_budget, e.max_batch_size, e.rebalance_interval) == (512, 256, 8)
    assert (e.sm_overload, e.device, e.executor, e.seed) == (0.1, "auto", "mps", 7)
    assert cfg.meshes is not None
    mesh, _ = cfg.meshes
    assert (mesh.name, mesh.node, mesh.gpus, mesh.kv_pool_bytes) == ("m0", 0, [0, 1], None)
    assert [(m.name, m.tensor_parallel, m.kv_share, m.rate) for m in mesh.models] == [
        ("llama", 2, 0.75, 2.0)
    ]
    assert cfg.model("qwen") is qwen


def test_minimal_config_defaults() -> None:
    cfg = parse_config({"models": [{"name": "a", "path": "/a"}]})
    assert cfg.engine == EngineConfig()
    assert cfg.meshes is None
    e = EngineConfig()
    assert (e.kv_pool_bytes, e.block_bytes, e.policy, e.kv_mode) == (
        None,
        16 << 10,
        "adbs",
        "unified",
    )


def with_change(path: str, value: object) -> dict:
    """good() with the value at a dotted path replaced (or added)."""
    raw = good()
    *head, last = path.split(".")
    node: object = raw
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
    node[int(last) if isinstance(node, list) else last] = value  # type: ignore[index]
    return raw


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("models.0.rate", 0, "models.0.rate"),
        ("models.1.rate", -1.0, "models.1.rate"),
        ("models.0.dtype", "int8", "models.0.dtype"),
        ("models.0.name", "", "models.0.name"),
        ("models.1.max_model_len", 0, "models.1.max_model_len"),
        ("models.0.sm_share.prefill", 1.5, "models.0.sm_share.prefill"),
        ("models.0.sm_share.decode", 0.0, "models.0.sm_share.decode"),
        ("models.0.tensor_parallel", 0, "models.0.tensor_parallel"),
        ("engine.policy", "round-robin", "engine.policy"),
        ("engine.kv_mode", "paged", "engine.kv_mode"),
        ("engine.block_bytes", 0, "engine.block_bytes"),
        ("engine.sm_overload", 2.0, "engine.sm_overload"),
        ("engine.executor", "ray", "engine.executor"),
        ("meshes.0.gpus", [], "meshes.0.gpus"),
        ("meshes.0.models.0.kv_share", 0.0, "meshes.0.models.0.kv_share"),
        ("models", [], "models"),
    ],
)
def test_errors_name_the_dotted_key(path: str, value: object, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(path, value), source="serve.yaml")
    msg = str(info.value)
    assert msg.startswith("serve.yaml: ")
    assert f"{key}: " in msg


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("models.0.nmae", "models.0.nmae"),
        ("engine.kv_pool_size", "engine.kv_pool_size"),
        ("meshes.0.models.0.share", "meshes.0.models.0.share"),
        ("extras", "extras"),
    ],
)
def test_unknown_keys_rejected(path: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: Extra inputs are not permitted"):
        parse_config(with_change(path, 1))


def test_duplicate_model_names() -> None:
    raw = good()
    raw["models"].append({"name": "llama", "path": "/elsewhere"})
    with pytest.raises(ConfigError, match="duplicate model names: llama"):
        parse_config(raw)


def test_mesh_naming_an_unknown_model() -> None:
    raw = with_change("meshes.0.models", [{"name": "llama"}, {"name": "mistral"}])
    with pytest.raises(ConfigError, match="mesh 'm0' names unknown models: mistral"):
        parse_config(raw)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("meshes.1.gpus", [1], "meshes 'm0' and 'm1' both claim GPU 1 of node 0"),
        ("meshes.1.name", "m0", "duplicate mesh names: m0"),
        ("meshes.1.name", "", "meshes.1.name"),
        ("meshes.0.gpus", [0, 0], "mesh 'm0' lists a GPU twice: [0, 0]"),
        ("meshes.0.gpus", [0, -1], "mesh 'm0': GPU indices must be >= 0"),
        ("meshes.0.gpus", [0], "mesh 'm0': llama has tensor_parallel=2 but the mesh has 1 GPUs"),
        ("meshes.1.models", [{"name": "llama"}], "no mesh serves qwen"),
        ("meshes.1.models", [{"name": "qwen"}, {"name": "qwen"}], "mesh 'm1' lists qwen twice"),
        ("meshes.1.kv_pool_bytes", 0, "meshes.1.kv_pool_bytes"),
        ("meshes.1.kv_pool_bytes", 4095, "mesh 'm1': kv_pool_bytes (4095) holds no block of"),
        (
            "meshes.1.models",
            [{"name": "qwen", "kv_share": 0.6}, {"name": "llama", "kv_share": 0.5}],
            "mesh 'm1': kv_share adds up to 1.1, over the whole pool",
        ),
    ],
)
def test_bad_meshes(path: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(path, value))
    assert message in str(info.value)


def test_same_gpu_index_on_two_nodes_is_two_gpus() -> None:
    raw = with_change("meshes.1.gpus", [1])
    raw["meshes"][1]["node"] = 1
    assert [m.node for m in parse_config(raw).meshes or []] == [0, 1]


def test_for_mesh_projects_the_plan() -> None:
    raw = with_change("meshes.1.kv_pool_bytes", 1 << 19)
    raw["meshes"][1]["models"] = [
        {"name": "qwen", "sm_share": {"prefill": 0.5, "decode": 0.25}, "kv_share": 0.5}
    ]
    cfg = parse_config(raw)
    m0 = cfg.for_mesh("m0")
    (llama,) = m0.models
    assert (llama.name, llama.path, llama.dtype) == ("llama", "/models/llama", "bfloat16")
    assert (llama.tensor_parallel, llama.kv_share, llama.rate) == (2, 0.75, 2.0)
    assert llama.sm_share == SMShare(prefill=0.6, decode=0.3)  # unset on the mesh: the model's
    assert (m0.meshes, m0.engine) == (None, cfg.engine)
    m1 = cfg.for_mesh(cfg.mesh("m1"))
    (qwen,) = m1.models
    assert (qwen.tensor_parallel, qwen.kv_share, qwen.rate) == (1, 0.5, 1.0)  # no rate: the model's
    assert qwen.sm_share == SMShare(prefill=0.5, decode=0.25)
    assert m1.engine.kv_pool_bytes == 1 << 19
    assert m1.engine.model_copy(update={"kv_pool_bytes": 1 << 20}) == cfg.engine
    with pytest.raises(KeyError, match="no mesh 'm9'"):
        cfg.for_mesh("m9")


def test_block_bigger_than_the_pool() -> None:
    raw = with_change("engine.block_bytes", 2 << 20)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "engine: " in str(info.value)
    assert "block_bytes (2097152) exceeds kv_pool_bytes (1048576)" in str(info.value)


@pytest.mark.parametrize("raw", [None, [], "models: []", 3])
def test_not_a_mapping(raw: object) -> None:
    with pytest.raises(ConfigError, match="<config>: expected a mapping"):
        parse_config(raw)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{path}: no such config file"):
        load_config(path)


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models: [\n  {name: a\n")
    with pytest.raises(ConfigError, match=f"{path}: malformed YAML"):
        load_config(path)


def test_invalid_value_in_a_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - name: a\n    path: /a\n    rate: -2\n")
    with pytest.raises(ConfigError, match=f"{path}: models.0.rate: "):
        load_config(path)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake home, and no MUXSERVE_CACHE (restored afterwards even if the parser sets it)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MUXSERVE_CACHE", "placeholder")
    monkeypatch.delenv("MUXSERVE_CACHE")
    return tmp_path


def test_cache_variable_expands(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUXSERVE_CACHE", "/data/cache")
    cfg = parse_config({"models": [{"name": "a", "path": "${MUXSERVE_CACHE}/demo/a"}]})
    assert cfg.models[0].path == "/data/cache/demo/a"
    assert default_cache_dir() == Path("/data/cache")


def test_cache_variable_defaults_under_home(home: Path) -> None:
    cfg = parse_config({"models": [{"name": "a", "path": "$MUXSERVE_CACHE/demo/a"}]})
    assert cfg.models[0].path == str(home / ".cache" / "muxserve" / "demo" / "a")
    assert default_cache_dir() == home / ".cache" / "muxserve"


def test_tilde_expands(home: Path) -> None:
    cfg = parse_config({"models": [{"name": "a", "path": "~/models/a"}]})
    assert cfg.models[0].path == str(home / "models" / "a")


def test_cache_dir_itself_may_use_tilde(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUXSERVE_CACHE", "~/mux")
    assert default_cache_dir() == home / "mux"


def test_dump_load_round_trip(tmp_path: Path) -> None:
    cfg = parse_config(good())
    path = tmp_path / "plan.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert isinstance(again, MuxConfig)
    assert "null" not in path.read_text()  # None fields are left out, not written as null
    dump_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


def test_round_trip_without_meshes(tmp_path: Path) -> None:
    cfg = parse_config({"models": [{"name": "a", "path": "/a"}], "engine": {"policy": "fcfs"}})
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


# ---- sleep and wake (issue 15) -------------------------------------------------------------
def inline(raw: dict) -> dict:
    raw["engine"]["executor"] = "inline"
    raw["meshes"][0]["models"][0]["tensor_parallel"] = 1
    return raw


def test_initial_state_and_residency_defaults() -> None:
    cfg = parse_config(inline(good()))
    assert [m.initial_state for m in cfg.models] == ["awake", "awake"]
    res = cfg.engine.residency
    assert (res.weights_budget_bytes, res.half_life_s, res.min_residency_s) == (None, 60.0, 10.0)
    assert (res.sleep_level, res.wake_timeout_s, res.idle_sleep_s) == (1, 30.0, None)


def test_a_mesh_may_list_a_model_asleep_and_set_its_weights_budget() -> None:
    raw = inline(good())
    raw["meshes"][1]["models"].append({"name": "llama", "initial_state": "asleep"})
    raw["meshes"][1]["weights_budget_bytes"] = 3 << 20
    cfg = parse_config(raw)
    m0, m1 = cfg.for_mesh("m0"), cfg.for_mesh("m1")
    assert [(m.name, m.initial_state) for m in m0.models] == [("llama", "awake")]
    assert [(m.name, m.initial_state) for m in m1.models] == [
        ("qwen", "awake"),
        ("llama", "asleep"),
    ]
    assert m1.engine.residency.weights_budget_bytes == 3 << 20
    assert m0.engine.residency == cfg.engine.residency


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("models.0.initial_state", "dozing", "models.0.initial_state"),
        ("meshes.1.models.0.initial_state", "off", "meshes.1.models.0.initial_state"),
        ("engine.residency.weights_budget_bytes", 0, "engine.residency.weights_budget_bytes"),
        ("engine.residency.half_life_s", 0, "engine.residency.half_life_s"),
        ("engine.residency.min_residency_s", -1, "engine.residency.min_residency_s"),
        ("engine.residency.sleep_level", 3, "engine.residency.sleep_level"),
        ("engine.residency.wake_timeout_s", 0, "engine.residency.wake_timeout_s"),
        ("engine.residency.idle_sleep_s", 0, "engine.residency.idle_sleep_s"),
        ("meshes.1.weights_budget_bytes", -5, "meshes.1.weights_budget_bytes"),
    ],
)
def test_bad_residency_settings_name_the_key(path: str, value: object, key: str) -> None:
    raw = inline(good())
    with pytest.raises(ConfigError, match=rf"{key}: "):
        parse_config(set_in(raw, path, value))


def set_in(raw: dict, path: str, value: object) -> dict:
    node: object = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})  # type: ignore[index]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # type: ignore[index]
    return raw
