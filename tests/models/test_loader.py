"""validate_checkpoint / load_model on good and broken checkpoint folders."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from muxserve.errors import CheckpointError, UnsupportedArchitectureError
from muxserve.models import loader
from muxserve.models.llama import LlamaForCausalLM, parameter_shapes
from muxserve.models.loader import (
    load_model,
    read_safetensors_header,
    validate_checkpoint,
)

MakeCheckpoint = Callable[..., Path]

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
Q_RE = re.escape(Q_PROJ)


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to read tensor data fail: validation must use the headers alone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("validate_checkpoint read tensor data")

    monkeypatch.setattr(loader, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_single_file(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_valid_checkpoints_return_their_config(
    make_checkpoint: MakeCheckpoint, no_tensor_reads: None
) -> None:
    config = validate_checkpoint(make_checkpoint("qwen2", max_shard_size="20KB"))
    assert config.architecture == "Qwen2ForCausalLM" and config.qkv_bias
    config = validate_checkpoint(make_checkpoint("mistral"))
    assert config.layer_sliding_windows == (4, 4)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 16}),
        ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
        ("qwen2", {}),
        ("mistral", {}),
    ],
)
def test_parameter_shapes_equal_the_models_parameters(
    family: str, overrides: dict[str, object], make_checkpoint: MakeCheckpoint
) -> None:
    config = validate_checkpoint(make_checkpoint(family, **overrides))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert parameter_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_parameter_shapes_follow_hf_names(make_checkpoint: MakeCheckpoint) -> None:
    folder = make_checkpoint("llama", head_dim=16, num_key_value_heads=2)
    shapes = parameter_shapes(validate_checkpoint(folder))
    on_disk = {n: i.shape for n, i in read_safetensors_header(folder / "model.safetensors").items()}
    assert shapes == on_disk
    assert shapes[Q_PROJ] == (64, 32) and shapes["model.layers.0.self_attn.k_proj.weight"] == (
        32,
        32,
    )


def test_unsupported_architecture(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "gpt2")
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        validate_checkpoint(folder)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        load_model(folder, torch.float32, "cpu")


def test_missing_config_json(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"noconfig.*config\.json"):
        validate_checkpoint(folder)


def test_missing_shard(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("qwen2", max_shard_size="20KB"), tmp_path / "sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"sharded.*shard {shard.name} .* is missing"):
        validate_checkpoint(folder)


def test_index_naming_a_tensor_its_shard_lacks(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("qwen2", max_shard_size="20KB"), tmp_path / "badindex")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][moved] = shards[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'{moved}' in {shards[1]}"):
        validate_checkpoint(folder)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_an_index_may_not_point_a_shard_outside_the_folder(
    make_checkpoint: MakeCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """An index naming /etc/passwd, ../../x or a symlink out of the folder: refused, unopened."""
    folder = copy_checkpoint(make_checkpoint("qwen2", max_shard_size="20KB"), tmp_path / "model")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / shards[1], outside)  # a real shard: only where it lies is wrong
    name = {"absolute": str(outside), "dotdot": "../outside.safetensors"}.get(where, shards[1])
    if where == "symlink":
        (folder / shards[1]).unlink()
        (folder / shards[1]).symlink_to(outside)
    index["weight_map"] = {t: name if f == shards[1] else f for t, f in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    opened: list[Path] = []
    read = loader.read_safetensors_header
    monkeypatch.setattr(loader, "read_safetensors_header", lambda f: opened.append(f) or read(f))
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(folder)
    assert str(info.value) == (
        f"{folder}: model.safetensors.index.json names shard {name!r}, which is "
        f"{outside.resolve()}, outside the model folder; refusing to open it"
    )
    assert outside.resolve() not in [f.resolve() for f in opened]


def test_a_hub_cache_snapshot_whose_shards_link_into_blobs_loads(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """Hugging Face's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>, outside the snapshot
    folder but inside its repo: allowed."""
    source = make_checkpoint("qwen2", max_shard_size="20KB")
    repo = tmp_path / "models--owner--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert validate_checkpoint(snapshot) == validate_checkpoint(source)


def test_missing_tensor(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "missing")
    rewrite_single_file(folder, lambda t: t.pop(Q_PROJ))
    with pytest.raises(CheckpointError, match=rf"missing.*{Q_RE}.*is missing"):
        validate_checkpoint(folder)


def test_untied_checkpoint_without_lm_head(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "nohead")
    rewrite_single_file(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight'.*is missing"):
        validate_checkpoint(folder)


def test_wrong_shape(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "shape")
    rewrite_single_file(folder, lambda t: t.update({Q_PROJ: torch.zeros(16, 32)}))
    with pytest.raises(CheckpointError, match=rf"shape.*'{Q_RE}'.*\(16, 32\), expected \(32, 32\)"):
        validate_checkpoint(folder)


def test_unexpected_tensor(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "extra")
    rewrite_single_file(
        folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t[Q_PROJ].clone()})
    )
    with pytest.raises(
        CheckpointError, match=re.escape("unexpected tensor 'model.layers.2.mlp.up_proj.weight'")
    ):
        validate_checkpoint(folder)


def test_quantized_dtype_is_refused(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "int8")
    rewrite_single_file(folder, lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"'{Q_RE}'.*dtype I8"):
        validate_checkpoint(folder)


def test_truncated_file(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, no_tensor_reads: None
) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "truncated")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        validate_checkpoint(folder)


def to_bin(src: Path, dst: Path, legacy: bool = False) -> Path:
    """A copy of checkpoint `src` in the .bin layouts: pytorch_model.bin, or shards and
    pytorch_model.bin.index.json; `legacy`: torch's old non-zip format (not memory-mappable)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    index = src / "model.safetensors.index.json"
    files = {"model.safetensors": "pytorch_model.bin"}
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {
            f: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            for f in set(weight_map.values())
        }
        bin_map = {name: files[f] for name, f in weight_map.items()}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": bin_map}))
    for st, bin_name in files.items():
        torch.save(load_file(src / st), dst / bin_name, _use_new_zipfile_serialization=not legacy)
    return dst


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_bin_checkpoint_loads_like_safetensors(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, legacy: bool
) -> None:
    src = make_checkpoint("llama", num_key_value_heads=2)
    folder = to_bin(src, tmp_path / "bin", legacy)
    assert validate_checkpoint(folder) == validate_checkpoint(src)
    ours, _ = load_model(folder, torch.float32, "cpu")
    ref, _ = load_model(src, torch.float32, "cpu")
    ours_params = dict(ours.named_parameters())
    assert all(torch.equal(ours_params[n], p) for n, p in ref.named_parameters())


def test_sharded_bin_checkpoint(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    src = make_checkpoint("qwen2", max_shard_size="20KB")
    folder = to_bin(src, tmp_path / "sharded-bin")
    assert len(list(folder.glob("pytorch_model-*.bin"))) > 2
    ours, _ = load_model(folder, torch.float32, "cpu")
    on_disk = load_file(next(src.glob("model-*.safetensors")))
    params = dict(ours.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in on_disk.items())


def test_bin_is_memory_mapped_and_weights_only(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = to_bin(make_checkpoint("llama"), tmp_path / "mmap")
    calls: list[dict[str, object]] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    load_model(folder, torch.float32, "cpu")
    assert calls and all(c["weights_only"] is True and c["mmap"] is True for c in calls)


def test_bin_whose_shapes_disagree_with_config(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    folder = to_bin(make_checkpoint("llama"), tmp_path / "badbin")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state[Q_PROJ] = torch.zeros(16, 32)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=rf"'{Q_RE}' in pytorch_model\.bin has shape \(16, 32\)"
    ):
        validate_checkpoint(folder)


def test_corrupt_bin(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "bin")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # not a torch file
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch"):
        validate_checkpoint(folder)


def test_no_weights_at_all(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "empty")
    (folder / "model.safetensors").rename(folder / "weights.pt")
    with pytest.raises(
        CheckpointError, match=r"none of model\.safetensors, .* is present \(found weights\.pt\)"
    ):
        validate_checkpoint(folder)


def test_tolerated_extras_are_skipped(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """A tied checkpoint that still saved lm_head, and an old rotary inv_freq buffer."""
    folder = copy_checkpoint(make_checkpoint("qwen2"), tmp_path / "extras")

    def add(t: dict[str, torch.Tensor]) -> None:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    rewrite_single_file(folder, add)
    model, config = load_model(folder, torch.float32, "cpu")
    assert config.tie_word_embeddings and model.lm_head is None


def test_load_casts_every_weight_exactly(make_checkpoint: MakeCheckpoint) -> None:
    folder = make_checkpoint("llama", attention_bias=True)
    on_disk = load_file(folder / "model.safetensors")
    model, _ = load_model(folder, torch.bfloat16, "cpu")
    params = dict(model.named_parameters())
    assert params.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(params[name], tensor.to(torch.bfloat16)), name


def test_bad_model_dtype(make_checkpoint: MakeCheckpoint) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_model(make_checkpoint("llama"), torch.int8, "cpu")


def test_rope_tables_hold_the_served_context(make_checkpoint: MakeCheckpoint) -> None:
    """max_position_embeddings 10^8 in config.json; 256 positions served: 256 in the table."""
    model, config = load_model(
        make_checkpoint("llama", max_position_embeddings=10**8), torch.float32, "cpu", 256
    )
    assert config.max_position_embeddings == 10**8
    assert model.model.rotary_emb.table_positions == 256


def test_absurd_sizes_are_refused_before_any_allocation(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hidden_size 10^9 is refused from config.json: no model is built, nothing is read."""
    folder = copy_checkpoint(make_checkpoint("llama"), tmp_path / "huge")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"hidden_size": 10**9}))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(loader, "build_model", refuse)
    message = (
        f"{folder / 'config.json'}: key 'hidden_size' is 1000000000, beyond any real model "
        "(at most 262144); refusing it before allocating anything"
    )
    with pytest.raises(CheckpointError) as info:
        load_model(folder, torch.float32, "cpu")
    assert str(info.value) == message
