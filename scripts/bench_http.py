"""HTTP benchmark: what the OpenAI server adds on top of the engine, and streaming throughput.

    python scripts/bench_http.py [--requests 300] [--clients 64] [--duration 10]
                                 [--out benchmarks/results/http]

1. Added latency: one-token completions, one at a time, through `muxserve serve` (a separate
   process on loopback, as deployed) and through an engine called directly in this process
   (add_request + stream); p50/p99 of each and of the difference. Both serve the demo config.
2. Throughput: `--clients` concurrent streaming clients, each sending 16-token requests back
   to back for `--duration` seconds, over HTTP and directly; requests/s and tokens/s.

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
                print("latency of 1-token completions ...", file=sys.stderr)
                lat = await latency(engine, session, url, args.requests)
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
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
    engine.shutdown()
    return {"latency": lat, "throughput": rows, "server_exit_code": rc}


def report(result: dict) -> None:
    lat = result["latency"]
    print(f"\n1-token completion latency, {lat['requests']} sequential requests (ms)")
    print(f"{'':>8}{'direct':>10}{'http':>10}{'added':>10}")
    for q in (50, 99):
        cells = [lat[f"{k}_p{q}_ms"] for k in ("direct", "http", "added")]
        print(f"{'p' + str(q):>8}" + "".join(f"{c:>10.2f}" for c in cells))
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
    (out / "bench_http.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out / 'bench_http.json'}", file=sys.stderr)
