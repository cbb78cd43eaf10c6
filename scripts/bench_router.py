"""Router benchmark: what the router adds on top of one engine, and streaming through it.

    python scripts/bench_router.py [--rounds 10] [--requests-per-round 200]
                                   [--streams-per-round 2] [--stream-tokens 256]
                                   [--model llama-demo] [--out benchmarks/results/router]

Two `muxserve serve` processes side by side, the same model on identically configured engines
(the direct config is the plan's `for_mesh()`), each with OMP_NUM_THREADS=1:

- direct: a plain config: one engine in the HTTP server's process (`InProcessClient`);
- router: a plan with one CPU mesh serving the model: the HTTP server's process routes to the
  mesh's engine, a child process (`python -m muxserve.mesh`) behind a loopback socket.

Measured from this process (a third one, so the client shares no GIL with either server), one
request at a time over a kept-alive connection per server, the two servers alternating request
by request (which goes first alternates too), in --rounds rounds:

1. a 1-token completion, not streamed: the time to the whole response;
2. a 1-token completion, streamed: TTFT, the time to the first event carrying a choice;
3. --streams-per-round completions of --stream-tokens tokens, streamed (ignore_eos):
   tokens/s (output tokens over the time from the send to [DONE]) and the gaps between events.

Per round and server the p50 and p99 of each; reported are the median over rounds with the
min and max, router / direct and router - direct (ms), the median of the paired differences
(each router request against the direct one next to it), and the load average. JSON and a
PNG of the distributions go to --out. Not a test: numbers depend on who else uses the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from muxserve.bench.report import format_table, machine, write_json
from muxserve.bench.server import ServerProcess
from muxserve.config import MuxConfig, dump_config, parse_config
from muxserve.demo import DEMO_ENGINE, DEMO_RATES

TARGETS = ("direct", "router")
MESH = "mesh-0"
PROMPT = "The quick brown fox jumps over the lazy dog"
REQUEST_TIMEOUT_S = 60.0  # one request longer than this is a failure, not a hang
WARMUP_REQUESTS = 10  # per target and short kind, unmeasured: first calls pay for lazy setup


# ---- the two servers -------------------------------------------------------------------------
def configs(model: str, model_path: Path) -> dict[str, MuxConfig]:
    """The router's plan (one CPU mesh serving `model`) and the direct config: that mesh's
    engine config, so both engines are set up exactly alike."""
    plan: dict[str, Any] = {
        "models": [{"name": model, "path": str(model_path), "rate": DEMO_RATES.get(model, 1.0)}],
        "engine": {**DEMO_ENGINE, "device": "cpu"},
        "meshes": [{"name": MESH, "gpus": [0], "models": [{"name": model}]}],
    }
    config = parse_config(plan)
    return {"direct": config.for_mesh(MESH), "router": config}


def start_servers(
    cfgs: dict[str, MuxConfig], tmp: Path, stack: ExitStack
) -> dict[str, ServerProcess]:
    """Start both servers at once (each loads its model) and wait until both serve."""
    procs = {}
    for name, cfg in cfgs.items():
        path = tmp / f"{name}.yaml"
        dump_config(cfg, path)
        log = stack.enter_context((tmp / f"{name}.log").open("w"))
        procs[name] = ServerProcess(path, log=log, startup_timeout=180.0)
    for name, proc in procs.items():
        try:
            stack.enter_context(proc)
        except RuntimeError:
            print((tmp / f"{name}.log").read_text()[-3000:], file=sys.stderr)
            raise
    return procs


# ---- one request -----------------------------------------------------------------------------
@dataclass
class Sample:
    """One request as the client saw it; times in seconds from the send."""

    latency: float | None = None  # to the end of the response ([DONE] when streamed)
    ttft: float | None = None  # to the first event carrying a choice (streamed only)
    gaps: list[float] = field(default_factory=list)  # between events carrying a choice
    tokens: int = 0  # completion tokens, the server's count
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency is not None


REQUESTS = ("latency_1tok", "ttft_1tok_stream", "stream")  # the kinds of request sent


@dataclass(frozen=True)
class Metric:
    """What is reported: values read off each successful request of one kind."""

    what: str
    unit: str
    requests: str  # the kind of request it is read from, one of REQUESTS
    read: Callable[[Sample], list[float]]
    tail: bool = True  # whether its p99 means something (a latency's does, a rate's not)


METRICS = {
    "latency_1tok": Metric(
        "1-token completion, not streamed: latency",
        "ms",
        "latency_1tok",
        lambda s: [s.latency * 1e3] if s.latency is not None else [],
    ),
    "ttft_1tok_stream": Metric(
        "1-token completion, streamed: TTFT",
        "ms",
        "ttft_1tok_stream",
        lambda s: [s.ttft * 1e3] if s.ttft is not None else [],
    ),
    "stream_gap": Metric(
        "long stream: gap between events", "ms", "stream", lambda s: [g * 1e3 for g in s.gaps]
    ),
    "stream_tokens_per_s": Metric(
        "long stream: output tokens/s",
        "tok/s",
        "stream",
        lambda s: [s.tokens / s.latency] if s.latency else [],
        tail=False,
    ),
}


class Target:
    """One server, spoken to over one kept-alive HTTP/1.1 connection (reopened after errors)."""

    def __init__(self, name: str, url: str, model: str) -> None:
        self.name = name
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.model = model
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
            self.conn.connect()
            assert self.conn.sock is not None
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def get_json(self, path: str) -> dict[str, Any]:
        conn = self._connection()
        conn.request("GET", path)
        data: dict[str, Any] = json.loads(conn.getresponse().read())
        return data

    def complete(self, max_tokens: int, stream: bool) -> Sample:
        """One greedy completion of PROMPT, exactly `max_tokens` tokens (ignore_eos)."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        sample = Sample()
        try:
            conn = self._connection()
            start = time.perf_counter()
            conn.request("POST", "/v1/completions", payload, headers)
            resp = conn.getresponse()
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
                return sample
            if stream:
                _read_events(resp, start, sample)
            else:
                data = json.loads(resp.read())
                sample.latency = time.perf_counter() - start
                sample.tokens = int(data["usage"]["completion_tokens"])
            if sample.ok and sample.tokens != max_tokens:
                sample.error = f"{sample.tokens} tokens, not {max_tokens}"
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            sample.error = f"{type(e).__name__}: {e}"
            self.close()
        return sample


def _read_events(resp: http.client.HTTPResponse, start: float, sample: Sample) -> None:
    """Read an SSE body into `sample` up to [DONE]; then the rest, so the connection is reusable."""
    last: float | None = None
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        now = time.perf_counter()
        if data == b"[DONE]":
            sample.latency = now - start
            break
        event = json.loads(data)
        if "error" in event:
            sample.error = f"error event: {event['error'].get('message', event['error'])}"
            break
        if event.get("choices"):
            if last is None:
                sample.ttft = now - start
            else:
                sample.gaps.append(now - last)
            last = now
        if event.get("usage"):
            sample.tokens = int(event["usage"]["completion_tokens"])
    resp.read()
    if sample.error is None and sample.latency is None:
        sample.error = "the stream ended without [DONE]"


# ---- the measurement -------------------------------------------------------------------------
Samples = dict[str, dict[str, list[list[Sample]]]]  # kind -> target -> round -> samples


def interleaved(targets: dict[str, Target], i: int) -> list[Target]:
    """A, B on even steps, B, A on odd ones: neither always goes first."""
    order = list(targets.values())
    return order if i % 2 == 0 else order[::-1]


def run_round(targets: dict[str, Target], args: argparse.Namespace, r: int, out: Samples) -> None:
    """One round: the short requests of both kinds, then the long streams, interleaved."""
    for kind in out:
        for t in targets:
            out[kind][t].append([])
    for i in range(args.requests_per_round):
        for target in interleaved(targets, r + i):
            out["latency_1tok"][target.name][r].append(target.complete(1, stream=False))
        for target in interleaved(targets, r + i):
            out["ttft_1tok_stream"][target.name][r].append(target.complete(1, stream=True))
    for i in range(args.streams_per_round):
        for target in interleaved(targets, r + i):
            out["stream"][target.name][r].append(target.complete(args.stream_tokens, True))


def warm_up(targets: dict[str, Target], stream_tokens: int) -> None:
    for target in targets.values():
        for _ in range(WARMUP_REQUESTS):
            target.complete(1, stream=False)
            target.complete(1, stream=True)
        target.complete(stream_tokens, stream=True)


# ---- statistics ------------------------------------------------------------------------------
def pct(xs: Sequence[float], q: float) -> float:
    """numpy's linear interpolation, as `muxserve.bench.metrics`."""
    return float(np.percentile(xs, q))


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-round values."""
    return {
        k: round(f(xs), 4) for k, f in (("median", statistics.median), ("min", min), ("max", max))
    }


def values(metric: str, samples: list[Sample]) -> list[float]:
    """`metric`'s values over the successful requests of `samples`."""
    read = METRICS[metric].read
    return [x for s in samples if s.ok for x in read(s)]


def summarize(metric: str, rounds: dict[str, list[list[Sample]]]) -> dict[str, Any]:
    """Per target: p50/p99 per round (median, min, max over rounds) and over every request;
    then router against direct, per round and per adjacent pair of requests."""
    m = METRICS[metric]
    out: dict[str, Any] = {"what": m.what, "unit": m.unit}
    per_round: dict[str, dict[int, list[float]]] = {}
    for t in TARGETS:
        vals = [values(metric, rs) for rs in rounds[t]]
        vals = [v for v in vals if v]
        pooled = [x for v in vals for x in v]
        if not pooled:
            return out | {"error": f"no successful {t} requests"}
        per_round[t] = {q: [pct(v, q) for v in vals] for q in (50, 99)}
        out[t] = {
            "n": len(pooled),
            "p50": spread(per_round[t][50]),
            "p99": spread(per_round[t][99]),
            "pooled": {f"p{q}": round(pct(pooled, q), 4) for q in (25, 50, 75, 99)},
        }
    d, r = per_round["direct"], per_round["router"]
    for q in (50, 99):
        out[f"router_minus_direct_p{q}"] = spread([b - a for a, b in zip(d[q], r[q], strict=True)])
        out[f"router_over_direct_p{q}"] = spread([b / a for a, b in zip(d[q], r[q], strict=True)])
    if m.requests != "stream":  # one value per request: the i-th of each target are a pair
        pairs = [
            b - a
            for rd, rr in zip(rounds["direct"], rounds["router"], strict=True)
            for sd, sr in zip(rd, rr, strict=True)
            if sd.ok and sr.ok
            for a, b in zip(m.read(sd), m.read(sr), strict=True)
        ]
        out["paired_difference_median"] = round(statistics.median(pairs), 4)
    return out


def raw_values(samples: Samples) -> dict[str, dict[str, list[list[float]]]]:
    """Every request's value per metric, target and round (not the gaps: hundreds a stream)."""
    return {
        metric: {
            t: [[round(x, 3) for x in values(metric, rs)] for rs in rounds]
            for t, rounds in samples[METRICS[metric].requests].items()
        }
        for metric in METRICS
        if metric != "stream_gap"
    }


def outcomes(samples: Samples) -> dict[str, Any]:
    """Per kind and target: requests sent, succeeded, and the errors by message."""
    out: dict[str, Any] = {}
    for kind, by_target in samples.items():
        for t, rounds in by_target.items():
            flat = [s for rs in rounds for s in rs]
            errors = Counter(s.error for s in flat if s.error is not None)
            out.setdefault(kind, {})[t] = {
                "sent": len(flat),
                "ok": sum(s.ok for s in flat),
                "errors": dict(errors.most_common(5)),
            }
    return out


def table(summary: dict[str, Any]) -> str:
    cols = [("metric", 26), ("direct p50", 12), ("router p50", 12), ("+ms p50", 10)]
    cols += [("x p50", 7), ("direct p99", 12), ("router p99", 12), ("+ms p99", 10)]
    rows = []
    for metric, s in summary.items():
        if "error" in s:
            rows.append([metric, *["-"] * (len(cols) - 1)])
            continue
        row = [
            metric,
            f"{s['direct']['p50']['median']:.2f}",
            f"{s['router']['p50']['median']:.2f}",
            f"{s['router_minus_direct_p50']['median']:+.3f}",
            f"{s['router_over_direct_p50']['median']:.3f}",
        ]
        if METRICS[metric].tail:
            row += [
                f"{s['direct']['p99']['median']:.2f}",
                f"{s['router']['p99']['median']:.2f}",
                f"{s['router_minus_direct_p99']['median']:+.3f}",
            ]
        rows.append(row + ["-"] * (len(cols) - len(row)))
    return format_table(rows, cols)


# ---- the plot --------------------------------------------------------------------------------
def plot(samples: Samples, path: Path, title: str) -> None:
    """Box plots, direct vs router, of every value of each metric (whiskers at p1 and p99)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatter

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.0 * len(METRICS), 4.2), squeeze=False)
    for ax, (name, metric) in zip(axes[0], METRICS.items(), strict=True):
        source = samples[metric.requests]
        data = [values(name, [s for rs in source[t] for s in rs]) for t in TARGETS]
        if not all(data):
            ax.set_visible(False)
            continue
        ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2})
        ax.set_xticks(
            [1, 2],
            [
                f"{t}\n(n={len(d)}, p50 {pct(d, 50):.2f})"
                for t, d in zip(TARGETS, data, strict=True)
            ],
        )
        ax.set_ylabel(metric.unit)
        if metric.unit == "ms":  # a few slow requests would squash the boxes on a linear scale
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(
                LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5))
            )
        ax.set_title(metric.what, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------
def bench(args: argparse.Namespace, cfgs: dict[str, MuxConfig]) -> tuple[Samples, dict[str, Any]]:
    """Start both servers, warm up, run every round; the samples and what the servers said."""
    samples: Samples = {k: {t: [] for t in TARGETS} for k in REQUESTS}
    servers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        started = start_servers(cfgs, Path(tmp), stack)
        targets = {t: Target(t, started[t].url, args.model) for t in TARGETS}
        for t, target in targets.items():
            servers[t] = {"health": target.get_json("/health")}
        print("servers up; warming up", file=sys.stderr)
        warm_up(targets, args.stream_tokens)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            run_round(targets, args, r, samples)
            p50 = {
                t: statistics.median(values("latency_1tok", samples["latency_1tok"][t][r]) or [0])
                for t in TARGETS
            }
            tps = {
                t: statistics.median(values("stream_tokens_per_s", samples["stream"][t][r]) or [0])
                for t in TARGETS
            }
            print(
                f"round {r + 1}/{args.rounds} ({time.perf_counter() - t0:.1f}s): 1-token p50 "
                f"direct {p50['direct']:.2f} ms, router {p50['router']:.2f} ms "
                f"({p50['router'] - p50['direct']:+.2f}); stream tok/s direct "
                f"{tps['direct']:.0f}, router {tps['router']:.0f}; "
                f"load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
            )
        for target in targets.values():
            target.close()
        for t in TARGETS:
            servers[t]["exit_code"] = started[t].stop()
    return samples, servers


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--requests-per-round", type=int, default=200, help="1-token requests per kind and server"
    )
    p.add_argument("--streams-per-round", type=int, default=2, help="long streams per server")
    p.add_argument("--stream-tokens", type=int, default=256, help="tokens of a long stream")
    p.add_argument("--model", default="llama-demo", help="a demo model")
    p.add_argument("--out", default="benchmarks/results/router")
    args = p.parse_args()

    from muxserve.demo import ensure_demo_models

    models = ensure_demo_models(progress=True)
    if args.model not in models:
        p.error(f"--model must be one of {', '.join(models)}")
    # Both servers (and the router's mesh, which inherits the environment) on one torch
    # thread each: neither gets more of the shared cores than the other.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MUXSERVE_LOG_LEVEL", "WARNING")
    cfgs = configs(args.model, models[args.model])
    load_start = os.getloadavg()
    print(f"load average {load_start[0]:.2f}; starting both servers", file=sys.stderr)
    samples, servers = bench(args, cfgs)
    load_end = os.getloadavg()
    summary = {m: summarize(m, samples[METRICS[m].requests]) for m in METRICS}
    result = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "load_avg_start": list(load_start),
        "load_avg_end": list(load_end),
        "model": args.model,
        "prompt": PROMPT,
        "args": vars(args),
        "configs": {t: c.model_dump(mode="json", exclude_none=True) for t, c in cfgs.items()},
        "servers": servers,
        "requests": outcomes(samples),
        "summary": summary,
        "values": raw_values(samples),
    }
    out = Path(args.out)
    write_json(out / "router.json", result)
    print(f"\n{table(summary)}\n")
    print("p50/p99 per round, median over rounds; +ms: router - direct; x: router / direct")
    for metric, s in summary.items():
        if "paired_difference_median" in s:
            diff = s["paired_difference_median"]
            print(f"{metric}: median paired difference router - direct {diff:+.3f} ms")
    print(f"load average: {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")
    title = (
        f"router (1 CPU mesh, a child process) vs direct (the engine in the server): "
        f"{args.model}, OMP_NUM_THREADS=1\n{args.rounds} rounds x "
        f"{args.requests_per_round} 1-token requests of each kind and "
        f"{args.streams_per_round} {args.stream_tokens}-token streams per server, interleaved; "
        f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}"
    )
    plot(samples, out / "router.png", title)
    print(f"wrote {out / 'router.json'}, {out / 'router.png'}", file=sys.stderr)
    failed = sum(o["sent"] - o["ok"] for by_t in result["requests"].values() for o in by_t.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
