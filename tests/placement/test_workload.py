from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from muxserve.errors import ConfigError
from placement.workload import (
    PAPER_ALPHAS,
    SLO,
    load_workload,
    paper_workload,
    power_law_rates,
)
from tests.helpers.placement import CONFIGS


def test_defaults_apply(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text(
        "defaults: {prompt_len: 10, output_len: 20, slo: {ttft: 1.0, tpot: 0.1}}\n"
        "models:\n  - {name: a, rate: 2}\n  - {name: b, rate: 1, output_len: 5, slo: {scale: 4}}\n"
    )
    wl = load_workload(f, ["a", "b"])
    a, b = wl.demands
    assert (a.rate, a.prompt_len, a.output_len, a.slo) == (2, 10, 20, SLO(ttft=1.0, tpot=0.1))
    assert (b.prompt_len, b.output_len, b.slo) == (10, 5, SLO(scale=4))
    assert wl.total_rate == 3
    assert wl.arrival.process == "poisson"


def test_order_follows_the_models_file(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("models: [{name: a, rate: 1}, {name: b, rate: 2}]\n")
    assert [d.name for d in load_workload(f, ["b", "a"]).demands] == ["b", "a"]


def test_errors(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("models: [{name: a, rate: 0}]\n")
    with pytest.raises(
        ConfigError, match=r"w\.yaml: models\.0\.rate: Input should be greater than 0"
    ):
        load_workload(f)
    f.write_text("models: [{name: a, rate: 1, slo: {scale: 2, ttft: 1}}]\n")
    with pytest.raises(ConfigError, match=r"models\.0\.slo: .*either scale, or ttft"):
        load_workload(f)
    f.write_text("arrival: {process: poisson, cv: 2}\nmodels: [{name: a, rate: 1}]\n")
    with pytest.raises(ConfigError, match=r"arrival: .*use process: gamma"):
        load_workload(f)
    f.write_text("models: [{name: a, rate: 1}, {name: z, rate: 1}]\n")
    with pytest.raises(ConfigError, match=r"models\.1\.name: 'z' is not in the models file"):
        load_workload(f, ["a", "b"])
    f.write_text("models: [{name: a, rate: 1}]\n")
    with pytest.raises(ConfigError, match=r"w\.yaml: models: no entry for 'b'"):
        load_workload(f, ["a", "b"])


def test_power_law() -> None:
    assert power_law_rates(3, 1.0, 12.0) == [12.0, 6.0, 4.0]
    assert power_law_rates(2, 2.0, 8.0) == [8.0, 2.0]


def test_committed_paper_workloads_match_the_generator() -> None:
    names = [f"llm-{i}" for i in range(19)]
    for a in PAPER_ALPHAS:
        f = CONFIGS / "workloads" / f"paper-alpha{a}.yaml"
        assert yaml.safe_load(f.read_text()) == paper_workload(names, a, 40.0, 8.0)
        wl = load_workload(f, names)
        assert (wl.demands[0].rate, wl.demands[0].prompt_len, wl.demands[0].output_len) == (
            40.0,
            161,
            337,
        )
