"""The workload to plan for: per model a request rate, mean lengths and an SLO.

Also the paper's synthetic setup (power-law rates), so the committed workload files can be
regenerated and checked against their generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from muxserve.errors import ConfigError
from placement.files import Strict, load_file

PAPER_PROMPT_LEN = 161  # mean prompt tokens of the paper's synthetic workload
PAPER_OUTPUT_LEN = 337  # mean output tokens
PAPER_ALPHAS = (0.7, 0.9, 1.3, 1.7, 2.1)
MAX_MODELS = 1024  # models one plan covers (more: plan groups of models on groups of nodes)


class SLO(Strict):
    """Latency objective: absolute TTFT/TPOT bounds, or a scale of the model's own latency.

    `scale: k` means TTFT ≤ k × the model's prefill latency and TPOT ≤ k × its one-request
    decode step, both alone on its smallest mesh with every SM (the paper's "SLO scale").
    """

    scale: float | None = Field(None, gt=0)
    ttft: float | None = Field(None, gt=0)  # seconds to the first token
    tpot: float | None = Field(None, gt=0)  # seconds per output token after the first

    @model_validator(mode="after")
    def _one_form(self) -> SLO:
        if self.scale is not None and (self.ttft is not None or self.tpot is not None):
            raise ValueError("give either scale, or ttft and/or tpot, not both")
        if self.scale is None and self.ttft is None and self.tpot is None:
            raise ValueError("give scale, or ttft and/or tpot")
        return self


class Arrival(Strict):
    """How requests arrive: Poisson, or gamma with a coefficient of variation (burstiness)."""

    process: Literal["poisson", "gamma"] = "poisson"
    cv: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _poisson_cv(self) -> Arrival:
        if self.process == "poisson" and self.cv != 1.0:
            raise ValueError("a Poisson process has cv 1; use process: gamma for another cv")
        return self


class Defaults(Strict):
    prompt_len: int = Field(PAPER_PROMPT_LEN, ge=1)
    output_len: int = Field(PAPER_OUTPUT_LEN, ge=1)
    slo: SLO = SLO(scale=8.0)


class ModelLoad(Strict):
    name: str = Field(min_length=1)
    rate: float = Field(gt=0)  # requests/s
    prompt_len: int | None = Field(None, ge=1)  # mean prompt tokens
    output_len: int | None = Field(None, ge=1)  # mean output tokens
    slo: SLO | None = None


class WorkloadFile(Strict):
    """The `--workload` file."""

    arrival: Arrival = Arrival()
    defaults: Defaults = Defaults()
    models: list[ModelLoad] = Field(min_length=1, max_length=MAX_MODELS)


@dataclass(frozen=True)
class Demand:
    """One model's load, with defaults applied."""

    name: str
    rate: float
    prompt_len: int
    output_len: int
    slo: SLO


@dataclass(frozen=True)
class Workload:
    """Every model's demand, in the models file's order, and the arrival process."""

    demands: tuple[Demand, ...]
    arrival: Arrival = field(default_factory=Arrival)

    def demand(self, name: str) -> Demand:
        return next(d for d in self.demands if d.name == name)

    @property
    def total_rate(self) -> float:
        return sum(d.rate for d in self.demands)


def parse_workload(raw: WorkloadFile) -> Workload:
    """Apply the defaults to every model's entry."""
    d = raw.defaults
    demands = tuple(
        Demand(
            name=m.name,
            rate=m.rate,
            prompt_len=m.prompt_len or d.prompt_len,
            output_len=m.output_len or d.output_len,
            slo=m.slo or d.slo,
        )
        for m in raw.models
    )
    return Workload(demands, raw.arrival)


def load_workload(path: str | Path, model_names: list[str] | None = None) -> Workload:
    """Read a workload file; with `model_names`, it must name exactly those models."""
    raw = load_file(WorkloadFile, path)
    names = [m.name for m in raw.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: models: duplicate model names: {', '.join(dup)}")
    wl = parse_workload(raw)
    if model_names is None:
        return wl
    unknown = [n for n in names if n not in model_names]
    if unknown:
        i = names.index(unknown[0])
        raise ConfigError(
            f"{path}: models.{i}.name: {unknown[0]!r} is not in the models file "
            f"(models: {', '.join(model_names)})"
        )
    missing = [n for n in model_names if n not in names]
    if missing:
        raise ConfigError(f"{path}: models: no entry for {', '.join(repr(n) for n in missing)}")
    return Workload(tuple(wl.demand(n) for n in model_names), wl.arrival)


def power_law_rates(num_models: int, alpha: float, max_rate: float) -> list[float]:
    """The paper's synthetic rates: model i (from 0) gets `max_rate × (i + 1) ** -alpha`."""
    return [max_rate * (i + 1) ** -alpha for i in range(num_models)]


def paper_workload(names: list[str], alpha: float, max_rate: float, slo_scale: float) -> dict:
    """A workload file's contents for the paper's setup (rates in the order of `names`)."""
    rates = power_law_rates(len(names), alpha, max_rate)
    return {
        "arrival": {"process": "poisson"},
        "defaults": {
            "prompt_len": PAPER_PROMPT_LEN,
            "output_len": PAPER_OUTPUT_LEN,
            "slo": {"scale": slo_scale},
        },
        "models": [{"name": n, "rate": round(r, 4)} for n, r in zip(names, rates, strict=True)],
    }
