from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.errors import ConfigError
from placement.files import read_yaml, validate
from placement.gpus import ClusterFile
from tests.helpers.placement import CONFIGS


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("nodes: 4\ngpu: [A100\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML at line 3"):
        read_yaml(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        read_yaml(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(
        ConfigError, match=r"c\.yaml: expected a mapping at the top level, got list"
    ):
        validate(ClusterFile, [1, 2], "c.yaml")


def test_errors_name_the_dotted_key() -> None:
    raw = {"gpu": {"type": "A100-80GB", "memory_gib": -1}, "nodes": 2}
    with pytest.raises(
        ConfigError, match=r"c\.yaml: gpu\.memory_gib: Input should be greater than 0"
    ):
        validate(ClusterFile, raw, "c.yaml")


def test_extra_keys_are_forbidden() -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: nodez: Extra inputs are not permitted"):
        validate(ClusterFile, {"gpu": "H200", "nodez": 2}, "c.yaml")


def test_committed_configs_parse() -> None:
    for f in sorted((CONFIGS / "clusters").glob("*.yaml")):
        assert isinstance(read_yaml(f), dict)
