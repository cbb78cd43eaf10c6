"""HTTP benchmark: what the OpenAI server adds on top of the engine, and streaming throughput.

    python scripts/bench_http.py [--requests 300] [--clients 64] [--duration 10]
                                 [--out benchmarks/results/http]

1. Added latency: one-token completions, one at a time, through `muxserve serve` (a separate
   process on loopback, as deployed) and through an engine called directly in this process
   (add_request + stream); p50/p99 of each and of the difference. Both serve the demo config.
2. Throughput: `--clients` concurrent streaming clients, each sending 16-token requests back
   to back for `--duration` seconds, over HTTP and directly; requests/s and tokens/s.
3. Constrained decoding: the time per output token (decode, first token to last) of streamed
   requests whose output must match a JSON schema (llguidance masks, `response_format`)
   against unconstrained requests of the same length, at 1 and `--constrained-clients`
   requests at once, interleaved; and the engine-side cost of one step's masks alone.

`--parts` picks what to run (default: all three).

Not a test: numbers depend on the machine (and on whoever else is using it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from muxserve.config import dump_config
from muxserve.demo import default_config
from muxserve.engine import MuxEngine
from muxserve.sampling_params import SamplingParams

MODEL = "llama-demo"
PROMPT = "The quick brown fox jumps over the lazy dog"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def start_server(config_file: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "muxserve.cli", "serve", "--config", str(config_file)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "WARNING"], stderr=subprocess.DEVNULL
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(600):
        try:
            async with session.get(f"{url}/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the server did not start")


# ---- one request, each way ---------------------------------------------------------------
async def direct_request(engine: MuxEngine, max_tokens: int) -> int:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rid = engine.add_request(MODEL, PROMPT, params)
    tokens = 0
    async for out in engine.stream(rid):
        tokens += len(out.token_ids)
    return tokens


async def http_request(session: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with session.post(f"{url}/v1/completions", json=body) as r:
        data = await r.json()
    return int(data["usage"]["completion_tokens"])


async def http_stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


# ---- constrained decoding ----------------------------------------------------------------------
# a list of 12 small records: every sample writes about 100 tokens, then the grammar ends it
SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99},
            "tag": {"enum": ["red", "green", "blue"]},
        },
        "required": ["id", "tag"],
        "additionalProperties": False,
    },
    "minItems": 12,
    "maxItems": 12,
}


async def timed_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, float, float]:
    """(tokens, TTFT s, time per output token s after the first) of one streamed request,
    timed as each chunk's usage (continuous_usage_stats) says tokens arrived."""
    body = {**body, "stream": True}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    t0 = time.perf_counter()
    first: tuple[int, float] | None = None
    last = (0, t0)
    async with session.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            usage = json.loads(line[6:]).get("usage")
            if usage and usage["completion_tokens"] > last[0]:
                now = time.perf_counter()
                last = (usage["completion_tokens"], now)
                first = first or last
    assert first is not None
    tpot = (last[1] - first[1]) / max(last[0] - first[0], 1)
    return last[0], first[1] - t0, tpot


async def constrained(session: aiohttp.ClientSession, url: str, clients: int, rounds: int) -> dict:
    """Constrained vs unconstrained streams of the same length, `clients` at once."""
    base = {"model": MODEL, "prompt": PROMPT, "temperature": 1.0}
    json_body = {
        **base,
        "max_tokens": 400,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
    }
    got: dict[str, list[tuple[int, float, float]]] = {"constrained": [], "unconstrained": []}
    for r in range(rounds + 1):  # round 0 warms both paths up and is dropped
        runs = await asyncio.gather(
            *(
                timed_stream(session, url, {**json_body, "seed": r * 1000 + c})
                for c in range(clients)
            )
        )
        length = round(statistics.median(n for n, _, _ in runs))
        plain = {**base, "max_tokens": length, "ignore_eos": True}
        free = await asyncio.gather(
            *(timed_stream(session, url, {**plain, "seed": r * 1000 + c}) for c in range(clients))
        )
        if r:
            got["constrained"] += runs
            got["unconstrained"] += free
    row: dict[str, Any] = {"clients": clients, "requests": len(got["constrained"])}
    for kind, rows in got.items():
        tpots = [t for _, _, t in rows]
        row[f"{kind}_tokens_mean"] = statistics.mean(n for n, _, _ in rows)
        row[f"{kind}_tpot_p50_ms"] = pct(tpots, 50) * 1e3
        row[f"{kind}_tpot_mean_ms"] = statistics.mean(tpots) * 1e3
        row[f"{kind}_ttft_p50_ms"] = pct([t for _, t, _ in rows], 50) * 1e3
    row["added_tpot_p50_ms"] = row["constrained_tpot_p50_ms"] - row["unconstrained_tpot_p50_ms"]
    row["added_tpot_mean_ms"] = row["constrained_tpot_mean_ms"] - row["unconstrained_tpot_mean_ms"]
    return row


def mask_cost(engine: MuxEngine, batch: int, steps: int = 200) -> dict:
    """The engine-side part alone: one step's masks for `batch` requests (llguidance, in its
    threads), per step, over `steps` steps of a random walk through the grammar."""
    import random

    from muxserve.sampling_params import StructuredOutput
    from muxserve.structured_output import GrammarCompiler

    compiler = GrammarCompiler(engine.models[MODEL].tokenizer)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    rng = random.Random(0)
    constraints = [compiler.compile(spec) for _ in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    times = []
    for _ in range(steps):
        live = [i for i, c in enumerate(constraints) if not c.done]
        if not live:
            constraints = [compiler.compile(spec) for _ in range(batch)]
            outputs = [[] for _ in range(batch)]
            continue
        t = time.perf_counter()
        masks = compiler.fill_masks([constraints[i] for i in live])
        times.append(time.perf_counter() - t)
        for row, i in zip(masks, live, strict=True):
            bits = [
                w * 32 + b
                for w, word in enumerate(row.tolist())
                for b in range(32)
                if word >> b & 1
            ]
            outputs[i].append(rng.choice(bits))
            constraints[i].advance(outputs[i])
    return {
        "batch": batch,
        "steps": len(times),
        "mask_p50_us": pct(times, 50) * 1e6,
        "mask_mean_us": statistics.mean(times) * 1e6,
    }


# ---- the two measurements ------------------------------------------------------------------
async def latency(engine: MuxEngine, session: aiohttp.ClientSession, url: str, n: int) -> dict:
    for _ in range(20):  # warm up both paths
        await direct_request(engine, 1)
        await http_request(session, url, 1)
    direct, http = [], []
    for _ in range(n):  # interleaved, so drift on a shared machine hits both alike
        t = time.perf_counter()
        await direct_request(engine, 1)
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        await http_request(session, url, 1)
        http.append(time.perf_counter() - t)
    row: dict[str, Any] = {"requests": n}
    for q in (50, 99):
        row[f"direct_p{q}_ms"] = pct(direct, q) * 1e3
        row[f"http_p{q}_ms"] = pct(http, q) * 1e3
        row[f"added_p{q}_ms"] = row[f"http_p{q}_ms"] - row[f"direct_p{q}_ms"]
    row["added_mean_ms"] = (statistics.mean(http) - statistics.mean(direct)) * 1e3
    return row


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(clients: int, duration: float, one: Any, server_pid: int) -> dict:
    """`clients` loops of `one()` for `duration` s; CPU use of this process and the server's."""
    done, tokens = 0, 0
    cpu0 = (cpu_seconds(os.getpid()), cpu_seconds(server_pid))
    stop = time.perf_counter() + duration

    async def client() -> None:
        nonlocal done, tokens
        while time.perf_counter() < stop:
            n = await one()  # (not `tokens += await one()`: that reads `tokens` before waiting)
            tokens += n
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t
    cpu1 = (cpu_seconds(os.getpid()), cpu_seconds(server_pid))
    return {
        "clients": clients,
        "requests": done,
        "seconds": round(elapsed, 2),
        "requests_per_s": done / elapsed,
        "tokens_per_s": tokens / elapsed,
        "bench_process_cores": (cpu1[0] - cpu0[0]) / elapsed,  # client (+ direct engine)
        "server_process_cores": (cpu1[1] - cpu0[1]) / elapsed,
    }


async def main(args: argparse.Namespace) -> dict:
    config = default_config(progress=True)
    engine = MuxEngine(config)
    engine.start()
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "demo.yaml"
        dump_config(config, config_file)
        proc, url = start_server(config_file)
        try:
            connector = aiohttp.TCPConnector(limit=args.clients + 8)
            async with aiohttp.ClientSession(connector=connector) as session:
                await wait_ready(session, url)
                out: dict[str, Any] = {}
                if "constrained" in args.parts:
                    print("constrained vs unconstrained decoding ...", file=sys.stderr)
                    out["constrained"] = [
                        await constrained(session, url, c, args.constrained_rounds)
                        for c in (1, args.constrained_clients)
                    ]
                    out["mask_cost"] = [mask_cost(engine, b) for b in (1, args.constrained_clients)]
                if "latency" in args.parts:
                    print("latency of 1-token completions ...", file=sys.stderr)
                    out["latency"] = await latency(engine, session, url, args.requests)
                if "throughput" not in args.parts:
                    rows = None
                else:
                    print("streaming throughput ...", file=sys.stderr)
                    rows = [
                        {
                            "path": "direct",
                            **await throughput(
                                args.clients,
                                args.duration,
                                lambda: direct_request(engine, 16),
                                proc.pid,
                            ),
                        },
                        {
                            "path": "http-sse",
                            **await throughput(
                                args.clients,
                                args.duration,
                                lambda: http_stream(session, url, 16),
                                proc.pid,
                            ),
                        },
                    ]
                out["throughput"] = rows
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
    engine.shutdown()
    return {**out, "server_exit_code": rc, "load_avg_after": list(os.getloadavg())}


def report(result: dict) -> None:
    for row in result.get("constrained", []):
        print(
            f"\nJSON-schema constrained vs unconstrained decoding, {row['clients']} at once, "
            f"{row['requests']} requests each (ms per output token after the first)"
        )
        print(f"{'':>14}{'tokens':>9}{'TPOT p50':>10}{'TPOT mean':>11}{'TTFT p50':>10}")
        for kind in ("constrained", "unconstrained"):
            cells = [row[f"{kind}_tokens_mean"], row[f"{kind}_tpot_p50_ms"]]
            cells += [row[f"{kind}_tpot_mean_ms"], row[f"{kind}_ttft_p50_ms"]]
            print(f"{kind:>14}" + "".join(f"{c:>10.2f}" for c in cells))
        print(
            f"{'added':>14}{'':>9}{row['added_tpot_p50_ms']:>10.2f}{row['added_tpot_mean_ms']:>11.2f}"
        )
    for row in result.get("mask_cost", []):
        print(
            f"one step's masks for {row['batch']} requests: p50 {row['mask_p50_us']:.0f} us, "
            f"mean {row['mask_mean_us']:.0f} us"
        )
    if "latency" not in result:
        return
    lat = result["latency"]
    print(f"\n1-token completion latency, {lat['requests']} sequential requests (ms)")
    print(f"{'':>8}{'direct':>10}{'http':>10}{'added':>10}")
    for q in (50, 99):
        cells = [lat[f"{k}_p{q}_ms"] for k in ("direct", "http", "added")]
        print(f"{'p' + str(q):>8}" + "".join(f"{c:>10.2f}" for c in cells))
    if not result.get("throughput"):
        return
    print("\nstreaming throughput, 16-token requests")
    heads = ("path", "clients", "requests", "req/s", "tok/s", "bench cpu", "server cpu")
    print("".join(f"{h:>11}" for h in heads))
    for r in result["throughput"]:
        cells = [r["path"], r["clients"], r["requests"], f"{r['requests_per_s']:.1f}"]
        cells += [f"{r['tokens_per_s']:.0f}", f"{r['bench_process_cores']:.2f}"]
        cells += [f"{r['server_process_cores']:.2f}"]
        print("".join(f"{c:>11}" for c in cells))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="sequential requests per path")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    p.add_argument("--out", default="benchmarks/results/http")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=["latency", "throughput", "constrained"],
        default=["latency", "throughput", "constrained"],
    )
    p.add_argument("--constrained-clients", type=int, default=8, help="requests at once")
    p.add_argument("--constrained-rounds", type=int, default=5, help="rounds per concurrency")
    args = p.parse_args()
    result = asyncio.run(main(args))
    result["args"] = vars(args)
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_http.json" if len(args.parts) == 3 else f"bench_http_{'_'.join(args.parts)}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out / name}", file=sys.stderr)
