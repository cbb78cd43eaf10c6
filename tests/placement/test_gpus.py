from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.errors import ConfigError
from placement.gpus import BUILTIN_GPUS, GIB, load_cluster, make_cluster
from tests.helpers.placement import CONFIGS


def test_builtin_gpus() -> None:
    assert set(BUILTIN_GPUS) == {"A100-40GB", "A100-80GB", "H100-80GB", "H200", "L40S"}
    a100 = BUILTIN_GPUS["A100-80GB"]
    assert (a100.memory_bytes, a100.peak_flops, a100.hbm_bytes_per_s, a100.sm_count) == (
        80 * GIB,
        312e12,
        2039e9,
        108,
    )


def test_paper_cluster() -> None:
    c = load_cluster(CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml")
    assert (c.gpu.name, c.nodes, c.gpus_per_node, c.num_gpus) == ("A100-80GB", 4, 8, 32)


def test_overrides_and_planner_knobs() -> None:
    c = load_cluster(CONFIGS / "clusters" / "1x8-h100-custom.yaml")
    assert c.gpu.name == "H100-80GB"
    assert c.gpu.memory_gib == 79.6
    assert c.gpu.peak_tflops == 989  # not overridden
    assert c.planner.sm_levels == (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)


def test_unknown_gpu_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("gpu: {type: B200}\nnodes: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: gpu: .*unknown GPU type 'B200'"):
        load_cluster(f)
    f.write_text("gpu: A100-80GB\nplanner: {sm_levels: [0.0, 0.5]}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: planner\.sm_levels: .*shares in \(0, 1\]"):
        load_cluster(f)


def test_missing_profile_names_it(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("gpu: H200\nprofile: table.json\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: profile: no such file .*table\.json"):
        load_cluster(f)


def test_make_cluster() -> None:
    assert make_cluster("L40S", 2, 4).num_gpus == 8
    with pytest.raises(ConfigError, match="unknown GPU type"):
        make_cluster("X", 1, 1)
