"""Synthetic multi-model workloads: power-law popularity, bursty arrivals, staggered ramps.

- Popularity: model i's mean rate is proportional to (i + 1) ** -alpha (the MuxServe paper's
  power law; alpha 0 is uniform).
- Arrivals: a renewal process per model with gamma inter-arrival times whose coefficient of
  variation is `cv` (1: Poisson; above 1: bursty), run in "operational time" so that a
  time-varying rate keeps the same burstiness relative to the local rate.
- Staggered ramps: each model's rate rises and falls in turn (a raised-cosine bump over a
  floor), so at any time one model is hot and the others are nearly idle.
- Shifting popularity (`popularity="shifting"`): the power law's ranks rotate every phase
  (`shift_phases` phases over the duration, `shift_step` ranks each), so the set of hot models
  changes abruptly and every model is hot for a while; over whole rotations every model has
  the same mean rate.
- Long tail (`popularity="longtail"`): a Zipf law over many models whose ranks are a seeded
  shuffle of the names (the popular models are not the first listed): a few models carry most
  of the load and most are nearly idle.
- Lengths: fixed, uniform, or "chat" (log-normal, long-tailed, with a given mean).

Everything is drawn from `numpy.random.default_rng([seed, i])` per model: the same spec gives
the same trace on any machine, and adding a model does not change the others' requests.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from muxserve.bench.trace import TraceEntry

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CHAT_SIGMA = 1.0  # log-normal shape of "chat" lengths: a long tail, p99 about 5x the median

_WORDS_TEXT = (
    "the of and to in is was for on with as by at from that this be are it an or have not "
    "but they which one you were all we her she there would their will when who him been "
    "has more if no out so said what up its about into than them can only other new some "
    "could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take "
    "three small large river city music light water story garden window market winter "
    "summer question answer number family school system program problem company country"
)
WORDS = tuple(_WORDS_TEXT.split())


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: `fixed:N`, `uniform:LO:HI` or `chat:MEAN[:MAX]`."""

    kind: Literal["fixed", "uniform", "chat"]
    low: int
    high: int
    mean: float

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, *nums = spec.split(":")
        try:
            vals = [int(x) for x in nums]
        except ValueError:
            raise ValueError(f"length {spec!r}: the numbers must be integers") from None
        if any(v < 1 for v in vals):
            raise ValueError(f"length {spec!r}: lengths must be at least 1")
        if kind == "fixed" and len(vals) == 1:
            return cls("fixed", vals[0], vals[0], float(vals[0]))
        if kind == "uniform" and len(vals) == 2 and vals[0] <= vals[1]:
            return cls("uniform", vals[0], vals[1], (vals[0] + vals[1]) / 2)
        if kind == "chat" and len(vals) in (1, 2):
            high = vals[1] if len(vals) == 2 else 8 * vals[0]
            return cls("chat", 1, high, float(vals[0]))
        raise ValueError(f"length {spec!r}: use fixed:N, uniform:LO:HI or chat:MEAN[:MAX]")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` lengths as int64; chat lengths are log-normal with this mean, clipped to MAX."""
        if self.kind == "fixed":
            return np.full(n, self.low, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n)
        mu = math.log(self.mean) - CHAT_SIGMA**2 / 2  # so that E[X] = mean before clipping
        x = rng.lognormal(mu, CHAT_SIGMA, size=n)
        return np.clip(np.rint(x), self.low, self.high).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.low}"
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"chat:{self.mean:g}:{self.high}"


DEFAULT_LENGTH = LengthDist("uniform", 16, 64, 40.0)


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a trace."""

    models: tuple[str, ...]
    rate: float  # mean requests/s over all models
    duration_s: float  # span of the arrival process
    alpha: float = 1.0  # popularity power law: rate_i ~ (i + 1) ** -alpha
    cv: float = 1.0  # coefficient of variation of inter-arrival times (1: Poisson)
    popularity: Literal["power", "shifting", "longtail"] = "power"
    shift_phases: int = 4  # shifting: phases over the duration, the ranks rotating each phase
    shift_step: int = 1  # shifting: ranks a model moves down (cyclically) from phase to phase
    ramp: Literal["none", "staggered"] = "none"
    ramp_floor: float = 0.1  # a model's off-peak rate as a fraction of its peak
    ramp_width: float = 0.5  # width of a model's bump as a fraction of a ramp cycle
    ramp_cycles: int = 1  # how many times each model's bump comes around
    prompt_len: LengthDist = DEFAULT_LENGTH
    output_len: LengthDist = DEFAULT_LENGTH
    max_total_len: int | None = None  # cap on prompt + output tokens per request
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a workload needs at least one model")
        if self.rate <= 0 or self.duration_s <= 0 or self.cv <= 0:
            raise ValueError("rate, duration and cv must be positive")
        if not 0 <= self.ramp_floor <= 1 or not 0 < self.ramp_width <= 1:
            raise ValueError("ramp_floor must be in [0, 1] and ramp_width in (0, 1]")
        if self.ramp_cycles < 1:
            raise ValueError("ramp_cycles must be at least 1")
        if self.shift_phases < 1 or self.shift_step < 0:
            raise ValueError("shift_phases must be at least 1 and shift_step at least 0")
        if self.popularity != "power" and self.ramp != "none":
            raise ValueError(f"popularity {self.popularity!r} sets the rates over time: no ramp")

    def meta(self) -> dict[str, Any]:
        """The spec as JSON-able data, for the trace's meta line."""
        d = asdict(self)
        d.update(
            models=list(self.models),
            prompt_len=str(self.prompt_len),
            output_len=str(self.output_len),
            nominal_duration_s=self.duration_s,
            mean_rates=dict(zip(self.models, self.model_rates(), strict=True)),
        )
        return d

    def rank_rates(self) -> list[float]:
        """Requests/s of popularity rank r (0: the most popular): the power law, summing to
        `rate`."""
        w = [(r + 1) ** -self.alpha for r in range(len(self.models))]
        return [self.rate * x / sum(w) for x in w]

    def ranks(self, phase: int = 0) -> list[int]:
        """Each model's popularity rank: its index ("power"), its index moved down by
        `shift_step` per phase ("shifting"), or a seeded shuffle ("longtail")."""
        n = len(self.models)
        if self.popularity == "shifting":
            return [(i + phase * self.shift_step) % n for i in range(n)]
        if self.popularity == "longtail":
            order = np.random.default_rng([self.seed, 1 << 20]).permutation(n)
            return [int(r) for r in np.argsort(order)]  # model order[r] has rank r
        return list(range(n))

    def model_rates(self) -> list[float]:
        """Mean requests/s of each model over the duration, summing to `rate`."""
        by_rank = self.rank_rates()
        if self.popularity != "shifting":
            return [by_rank[r] for r in self.ranks()]
        phases = [self.ranks(k) for k in range(self.shift_phases)]
        return [
            sum(by_rank[p[i]] for p in phases) / self.shift_phases for i in range(len(self.models))
        ]

    def intensity(self, i: int, t: np.ndarray) -> np.ndarray:
        """Model i's requests/s at times `t` (the mean rate times the shape, or, shifting,
        the rate of the rank it holds in each phase)."""
        if self.popularity != "shifting":
            return self.model_rates()[i] * self.shape(i, t)
        by_rank = np.array(self.rank_rates())
        n = len(self.models)
        phase = np.minimum(
            (t / self.duration_s * self.shift_phases).astype(np.int64), self.shift_phases - 1
        )
        return np.asarray(by_rank[(i + phase * self.shift_step) % n])

    def shape(self, i: int, t: np.ndarray) -> np.ndarray:
        """Model i's load over time relative to its mean (mean 1 over the duration)."""
        if self.ramp == "none":
            return np.ones_like(t)
        period = self.duration_s / self.ramp_cycles
        center = (i + 0.5) / len(self.models)  # staggered: model i peaks at this cycle phase
        phase = (t / period - center + 0.5) % 1.0 - 0.5  # in [-0.5, 0.5): distance to the peak
        x = phase / self.ramp_width
        bump = np.where(np.abs(x) < 0.5, np.cos(np.pi * x) ** 2, 0.0)
        s = self.ramp_floor + (1 - self.ramp_floor) * bump
        return np.asarray(s / s.mean())


def arrivals(spec: WorkloadSpec, i: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of model i: a gamma renewal process mapped through its rate's integral."""
    steps = 4096 * max(spec.ramp_cycles, spec.shift_phases if spec.popularity == "shifting" else 1)
    grid = np.linspace(0.0, spec.duration_s, steps + 1)
    lam = spec.intensity(i, grid)
    # cumulative expected arrivals at each grid point (trapezoids)
    cum = np.concatenate([[0.0], np.cumsum((lam[1:] + lam[:-1]) / 2 * np.diff(grid))])
    k = 1.0 / spec.cv**2  # gamma shape: variance / mean^2 = cv^2 with mean 1
    total = cum[-1]
    gaps = rng.gamma(k, 1.0 / k, size=int(total + 10 * math.sqrt(total + 1) + 16))
    ops = np.cumsum(gaps)
    while ops[-1] < total:  # rare: draw more
        ops = np.concatenate([ops, ops[-1] + np.cumsum(rng.gamma(k, 1.0 / k, size=len(ops)))])
    ops = ops[ops < total]
    return np.asarray(np.interp(ops, cum, grid))


class PromptMaker:
    """Prompt text of a given length from common English words.

    With a tokenizer the prompt has exactly that many tokens (no special tokens counted);
    without one the length counts words (about 1.3 tokens each with real LLM tokenizers).
    """

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer

    def make(self, rng: np.random.Generator, n: int) -> str:
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=n)]
        text = " ".join(words)
        if self.tokenizer is None:
            return text
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        while len(ids) < n:  # a tokenizer that merges whole words: add more
            text += " " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), size=n))
            ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return self.tokenizer.decode(ids[:n], skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers` tokenizer from a tokenizer.json or a checkpoint folder holding one;
    ValueError naming the path when there is none."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        where = "no such file or folder" if not p.exists() else "no tokenizer.json in it"
        raise ValueError(f"--tokenizer {path}: {where}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"--tokenizer {file}: not a tokenizers file ({e})") from None


def generate(
    spec: WorkloadSpec, tokenizer: Tokenizer | None = None
) -> tuple[list[TraceEntry], dict[str, Any]]:
    """The trace of `spec`, in arrival order, and its meta data."""
    maker = PromptMaker(tokenizer)
    entries: list[TraceEntry] = []
    for i, model in enumerate(spec.models):
        rng = np.random.default_rng([spec.seed, i])
        times = arrivals(spec, i, rng)
        plens = spec.prompt_len.sample(rng, len(times))
        olens = spec.output_len.sample(rng, len(times))
        for t, p, o in zip(times, plens, olens, strict=True):
            p, o = _fit(int(p), int(o), spec.max_total_len)
            prompt = maker.make(rng, p)
            entries.append(TraceEntry(round(float(t), 6), model, prompt, p, o))
    entries.sort(key=lambda e: (e.arrival_s, e.model))
    meta = spec.meta()
    meta["requests"] = len(entries)
    meta["tokenizer"] = tokenizer is not None
    return entries, meta


def _fit(prompt: int, output: int, limit: int | None) -> tuple[int, int]:
    """Shrink both lengths in proportion when prompt + output exceeds `limit`."""
    if limit is None or prompt + output <= limit:
        return prompt, output
    p = max(1, min(limit - 1, prompt * limit // (prompt + output)))
    return p, max(1, limit - p)


def add_workload_arguments(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """The workload options (shared by scripts/gen_workload.py and scripts/bench_modes.py)."""
    d: dict[str, Any] = {
        "rate": 4.0,
        "duration": 60.0,
        "alpha": 1.0,
        "cv": 1.0,
        "ramp": "none",
        "prompt_len": "uniform:16:64",
        "output_len": "uniform:16:64",
        **defaults,
    }
    g = p.add_argument_group("workload")
    g.add_argument(
        "--models", nargs="+", default=d.get("models"), help="model names, most popular first"
    )
    g.add_argument("--rate", type=float, default=d["rate"], help="mean requests/s, all models")
    g.add_argument("--duration", type=float, default=d["duration"], help="seconds of arrivals")
    g.add_argument(
        "--alpha", type=float, default=d["alpha"], help="popularity: rate_i ~ (i+1)^-alpha"
    )
    g.add_argument("--arrival", choices=["poisson", "gamma"], default=d.get("arrival", "gamma"))
    g.add_argument("--cv", type=float, default=d["cv"], help="gamma: inter-arrival CV (>1 bursty)")
    g.add_argument(
        "--popularity",
        choices=["power", "shifting", "longtail"],
        default=d.get("popularity", "power"),
        help="power: fixed power law; shifting: its ranks rotate every phase; longtail: Zipf "
        "over a seeded shuffle of the models (most nearly idle)",
    )
    g.add_argument(
        "--shift-phases", type=int, default=d.get("shift_phases", 4), help="shifting: phases"
    )
    g.add_argument(
        "--shift-step", type=int, default=d.get("shift_step", 1), help="shifting: ranks per phase"
    )
    g.add_argument("--ramp", choices=["none", "staggered"], default=d["ramp"])
    g.add_argument(
        "--ramp-floor", type=float, default=d.get("ramp_floor", 0.1), help="off-peak / peak rate"
    )
    g.add_argument(
        "--ramp-width", type=float, default=d.get("ramp_width", 0.5), help="bump width / cycle"
    )
    g.add_argument("--ramp-cycles", type=int, default=d.get("ramp_cycles", 1))
    g.add_argument(
        "--prompt-len", default=d["prompt_len"], help="fixed:N | uniform:LO:HI | chat:MEAN[:MAX]"
    )
    g.add_argument(
        "--output-len", default=d["output_len"], help="fixed:N | uniform:LO:HI | chat:MEAN[:MAX]"
    )
    g.add_argument(
        "--max-total-len", type=int, default=d.get("max_total_len"), help="cap prompt+output"
    )
    g.add_argument(
        "--tokenizer",
        default=d.get("tokenizer"),
        help="tokenizer.json (or folder): exact prompt lengths",
    )
    g.add_argument("--seed", type=int, default=d.get("seed", 0))


def spec_from_args(args: argparse.Namespace, models: Sequence[str] | None = None) -> WorkloadSpec:
    """The WorkloadSpec the options of `add_workload_arguments` describe."""
    names = tuple(args.models or models or ())
    return WorkloadSpec(
        models=names,
        rate=args.rate,
        duration_s=args.duration,
        alpha=args.alpha,
        cv=1.0 if args.arrival == "poisson" else args.cv,
        popularity=args.popularity,
        shift_phases=args.shift_phases,
        shift_step=args.shift_step,
        ramp=args.ramp,
        ramp_floor=args.ramp_floor,
        ramp_width=args.ramp_width,
        ramp_cycles=args.ramp_cycles,
        prompt_len=LengthDist.parse(args.prompt_len),
        output_len=LengthDist.parse(args.output_len),
        max_total_len=args.max_total_len,
        seed=args.seed,
    )
