"""Chaos benchmark: a steady mixed load while worker and mesh processes are stopped and killed.

    python scripts/chaos.py [--duration 300] [--rate 3] [--targets mps,plan] [--out DIR]

For each target — `mps` (one engine, a worker process per model and phase) and `plan` (three
meshes behind the router, each an mps engine) — a `muxserve serve` process runs the demo models
on this CPU while Poisson requests (completions and chat, streamed or not, every model) arrive,
and every few seconds one of the server's descendant processes (a worker, or a mesh) gets
SIGKILL, or SIGSTOP and later SIGCONT. Every request sent ends up counted as:

- completed: a full answer (a stream ending with [DONE], no error event);
- error: a clear error (an OpenAI error body with a status, or an error event, then [DONE]);
- lost: anything else — no answer within the client's deadline, a reset connection, a stream
  cut without an error event. The target is 0.

Afterwards every KV block must be free, no process of the server may be left after SIGTERM, and
no new /dev/shm entry of theirs may remain. Recovery time: from each fault until /health is
"ok" again. Results go to DIR/chaos.json and DIR/chaos.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from muxserve.bench.processes import descendants  # noqa: E402
from muxserve.config import dump_config, parse_config  # noqa: E402
from muxserve.demo import DEMO_ENGINE, DEMO_RATES, ensure_demo_models  # noqa: E402

SHM = Path("/dev/shm")
CLIENT_TIMEOUT_S = 180.0  # longer than any recovery: a request with no answer by then is lost
JOB_TIMEOUT_S = 60.0  # a job still running after this (+ 10 ms per token) is recomputed
# a running job whose worker uses no CPU this long (SIGSTOP) is recomputed: a slow job on this
# loaded host still uses CPU, so it is not cut short (a 10 s deadline alone recomputed slow
# prefills in a loop and stalled a model in an earlier run)
JOB_STALL_S = 5.0
MESH_HANG_TIMEOUT_S = 8.0  # a stopped mesh is killed and restarted after this
# a model whose queue would take longer than this at its recent rate refuses more (a 429 with
# that wait as Retry-After): an overloaded or stalled model answers at once, well within the
# client's deadline, instead of queueing requests that time out
MAX_QUEUE_WAIT_S = 60.0
# and a request still unfinished this long after it arrived ends with a clear timeout (504, or
# a stream's error event): what the queue bound let in on an overloaded host is answered too
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Outcome:
    target: str
    model: str
    stream: bool
    sent: float
    done: float
    kind: str  # completed | error | lost
    detail: str


@dataclass
class Fault:
    target: str
    at: float
    pid: int
    what: str  # "kill" | "stop <s>"
    role: str  # worker | mesh
    recovered_s: float | None = None


@dataclass
class TargetResult:
    target: str
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    errors_by_status: dict[str, int] = field(default_factory=dict)
    lost_details: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    recovery_p50_s: float | None = None
    recovery_p99_s: float | None = None
    leaked_blocks: int | None = None
    leaked_processes: list[int] = field(default_factory=list)
    leaked_shm: list[str] = field(default_factory=list)
    exit_code: int | None = None


# ---- the servers ---------------------------------------------------------------------------
def config_for(target: str, models: dict[str, Path]) -> dict[str, Any]:
    engine = {
        **DEMO_ENGINE,
        "device": "cpu",
        "executor": "mps",
        "job_timeout_s": JOB_TIMEOUT_S,
        "job_timeout_per_token_s": 0.01,
        "job_stall_s": JOB_STALL_S,
        "max_queue_wait_s": MAX_QUEUE_WAIT_S,
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }
    raw: dict[str, Any] = {
        "models": [
            {"name": n, "path": str(p), "rate": DEMO_RATES[n], "max_waiting": 64}
            for n, p in models.items()
        ],
        "engine": engine,
    }
    if target == "plan":
        raw["meshes"] = [
            {"name": f"mesh-{i}", "gpus": [i], "models": [{"name": n}]}
            for i, n in enumerate(models)
        ]
        raw["router"] = {"hang_timeout_s": MESH_HANG_TIMEOUT_S, "backoff_max_s": 4.0}
    return raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def role(cmd: str) -> str:
    return "mesh" if "muxserve.mesh" in cmd else "worker"


async def wait_healthy(session: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/health") as r:
                if r.status == 200 and (await r.json())["status"] == "ok":
                    return True
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.2)  # polling the server: there is no event to wait on here
    return False


# ---- the load ------------------------------------------------------------------------------
async def one_request(
    session: aiohttp.ClientSession, url: str, target: str, model: str, rng: random.Random, t0: float
) -> Outcome:
    stream = rng.random() < 0.5
    chat = rng.random() < 0.5
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": rng.randint(8, 48),
        "ignore_eos": True,
        "stream": stream,
        "temperature": 0.8,
        "seed": rng.randrange(1 << 30),
    }
    if chat:
        body["messages"] = [{"role": "user", "content": "Tell me a story about a lighthouse"}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "Once upon a time, in a city by the sea,"
        path = "/v1/completions"
    sent = time.monotonic() - t0

    def out(kind: str, detail: str) -> Outcome:
        return Outcome(target, model, stream, sent, time.monotonic() - t0, kind, detail)

    try:
        async with session.post(f"{url}{path}", json=body) as r:
            if r.status != 200:
                data = await r.json(content_type=None)
                if isinstance(data, dict) and "error" in data:
                    return out("error", f"{r.status} {data['error'].get('code')}")
                return out("lost", f"{r.status} without an OpenAI error body")
            if not stream:
                data = await r.json()
                reason = data["choices"][0]["finish_reason"]
                return out("completed" if reason in ("length", "stop") else "lost", str(reason))
            text = (await r.read()).decode()
    except asyncio.TimeoutError:
        return out("lost", f"no answer within {CLIENT_TIMEOUT_S:.0f} s")
    except (aiohttp.ClientError, OSError) as e:
        return out("lost", f"{type(e).__name__}: {e}")
    if not text.endswith("data: [DONE]\n\n"):
        return out("lost", "stream cut without [DONE]")
    events = [b[len("data: ") :] for b in text.split("\n\n")[:-1]]
    for ev in events[:-1]:
        data = json.loads(ev)
        if "error" in data:
            return out("error", f"stream error {data['error'].get('code')}")
    return out("completed", "stream")


async def load(
    session: aiohttp.ClientSession,
    url: str,
    target: str,
    models: list[str],
    rate: float,
    duration: float,
    rng: random.Random,
    t0: float,
) -> list[Outcome]:
    tasks = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        model = rng.choice(models)
        tasks.append(asyncio.create_task(one_request(session, url, target, model, rng, t0)))
        await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
    return list(await asyncio.gather(*tasks))


async def chaos(
    session: aiohttp.ClientSession,
    url: str,
    target: str,
    server_pid: int,
    duration: float,
    rng: random.Random,
    t0: float,
) -> list[Fault]:
    faults: list[Fault] = []
    end = time.monotonic() + duration
    await asyncio.sleep(3.0)  # the load is under way
    while time.monotonic() < end - 5:
        procs = {
            p: c for p, c in descendants(server_pid).items() if "resource_tracker" not in c
        }  # multiprocessing's bookkeeper is not ours to kill
        if not procs:
            break
        pid = rng.choice(sorted(procs))
        r = role(procs[pid])
        if rng.random() < 0.5:
            what = "kill"
            _signal(pid, signal.SIGKILL)
        else:
            stop_s = rng.uniform(1.0, 12.0)
            what = f"stop {stop_s:.1f}"
            _signal(pid, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(stop_s, _signal, pid, signal.SIGCONT)
        fault = Fault(target, time.monotonic() - t0, pid, what, r)
        faults.append(fault)
        print(f"[{target} {fault.at:6.1f}s] {what} {r} {pid}", file=sys.stderr)
        # recovery: until /health is ok again (a SIGCONT may come first and count as one)
        start = time.monotonic()
        await asyncio.sleep(0.5)
        if await wait_healthy(session, url, 120.0):
            fault.recovered_s = time.monotonic() - start
        await asyncio.sleep(rng.uniform(3.0, 10.0))
    return faults


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def run_target(
    target: str, models: dict[str, Path], args: argparse.Namespace, tmp: Path
) -> TargetResult:
    result = TargetResult(target)
    cfg = tmp / f"{target}.yaml"
    dump_config(parse_config(config_for(target, models)), cfg)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shm_before = {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()
    proc = subprocess.Popen(
        [sys.executable, "-m", "muxserve.cli", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"{target}.log", "w"),  # noqa: SIM115 - lives as long as the server
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    rng = random.Random(f"{args.seed}-{target}")
    try:
        # no connection limit: aiohttp's default of 100 would queue requests in this client,
        # on its own clock, whenever 100 are outstanding (they would count as lost)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            if not await wait_healthy(session, url, 300.0):
                raise RuntimeError(f"{target}: the server did not come up; see {tmp}")
            t0 = time.monotonic()
            print(f"[{target}] serving; {args.duration:.0f} s of load and faults", file=sys.stderr)
            outcomes, faults = await asyncio.gather(
                load(session, url, target, list(models), args.rate, args.duration, rng, t0),
                chaos(session, url, target, proc.pid, args.duration, rng, t0),
            )
            for pid in {f.pid for f in faults}:
                _signal(pid, signal.SIGCONT)  # nothing stays stopped
            await wait_healthy(session, url, 120.0)
            async with session.get(f"{url}/metrics") as r:  # the queues as the load ended
                (tmp / f"{target}.metrics.txt").write_text(await r.text())
            result.leaked_blocks = await leaked_blocks(session, url)
        survivors = descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result.exit_code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result.exit_code = proc.wait()
    result.requests = len(outcomes)
    for o in outcomes:
        result.outcomes[o.kind] = result.outcomes.get(o.kind, 0) + 1
        if o.kind == "error":
            result.errors_by_status[o.detail] = result.errors_by_status.get(o.detail, 0) + 1
        if o.kind == "lost":
            result.lost_details.append(f"{o.model} at {o.sent:.1f}s: {o.detail}")
    result.faults = faults
    rec = sorted(f.recovered_s for f in faults if f.recovered_s is not None)
    if rec:
        result.recovery_p50_s = rec[len(rec) // 2]
        result.recovery_p99_s = rec[min(len(rec) - 1, round(0.99 * (len(rec) - 1)))]
    deadline = time.monotonic() + 20.0  # a stopping mesh's workers end just after it
    while any(Path(f"/proc/{p}").exists() for p in survivors) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    result.leaked_processes = [p for p in survivors if Path(f"/proc/{p}").exists()]
    for p in result.leaked_processes:
        print(f"[{target}] left behind: {p} {survivors[p][:120]}", file=sys.stderr)
    ours = {str(proc.pid), *map(str, survivors)}
    new = ({p.name for p in SHM.iterdir()} if SHM.is_dir() else set()) - shm_before
    result.leaked_shm = sorted(n for n in new if any(pid in n for pid in ours))
    _plot_data[target] = outcomes
    return result


async def leaked_blocks(session: aiohttp.ClientSession, url: str) -> int:
    """KV blocks still held once every request has ended (summed over meshes)."""
    deadline = time.monotonic() + 30
    while True:
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        total = free = 0.0
        for line in text.splitlines():
            if line.startswith("muxserve_kv_blocks_total{"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("muxserve_kv_blocks_free{"):
                free += float(line.rsplit(" ", 1)[1])
        if total == free or time.monotonic() > deadline:
            return int(total - free)
        await asyncio.sleep(0.5)  # aborts and recomputes land within a few steps


_plot_data: dict[str, list[Outcome]] = {}


def plot(results: list[TargetResult], path: Path, args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), squeeze=False)
    colors = {"completed": "tab:green", "error": "tab:orange", "lost": "tab:red"}
    for ax, res in zip(axes[:, 0], results, strict=True):
        outs = _plot_data.get(res.target, [])
        for kind, color in colors.items():
            xs = [o.sent for o in outs if o.kind == kind]
            ys = [o.done - o.sent for o in outs if o.kind == kind]
            ax.scatter(xs, ys, s=8, c=color, label=f"{kind} ({len(xs)})")
        for f in res.faults:
            ax.axvline(f.at, color="tab:red" if f.what == "kill" else "tab:blue", alpha=0.3, lw=1)
        ax.set_yscale("log")
        ax.set_ylabel("request latency (s)")
        ax.set_title(
            f"{res.target}: {res.requests} requests at {args.rate}/s, {len(res.faults)} faults "
            f"(red: SIGKILL, blue: SIGSTOP); lost {res.outcomes.get('lost', 0)}"
        )
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time since the load started (s)")
    load = os.getloadavg()[0]
    fig.suptitle(
        f"Chaos on the demo models (CPU), {args.duration:.0f} s per target, load {load:.1f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load per target")
    p.add_argument("--rate", type=float, default=3.0, help="requests/s (Poisson)")
    p.add_argument("--targets", default="mps,plan", help="mps, plan, or both (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/chaos"))
    args = p.parse_args()
    models = ensure_demo_models()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    results = []
    logs = Path(tempfile.mkdtemp(prefix="muxserve-chaos-"))  # kept: the servers' logs
    print(f"server logs and configs in {logs}", file=sys.stderr)
    for target in args.targets.split(","):
        results.append(asyncio.run(run_target(target.strip(), models, args, logs)))
    report = {
        "command": " ".join(sys.argv),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "client_timeout_s": CLIENT_TIMEOUT_S,
        "job_timeout_s": JOB_TIMEOUT_S,
        "job_stall_s": JOB_STALL_S,
        "mesh_hang_timeout_s": MESH_HANG_TIMEOUT_S,
        "max_queue_wait_s": MAX_QUEUE_WAIT_S,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "targets": [asdict(r) for r in results],
    }
    (out / "chaos.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "chaos.png", args)
    bad = False
    for r in results:
        lost = r.outcomes.get("lost", 0)
        print(
            f"{r.target}: {r.requests} requests, {r.outcomes}, {len(r.faults)} faults, recovery "
            f"p50 {r.recovery_p50_s} s p99 {r.recovery_p99_s} s, leaked blocks {r.leaked_blocks}, "
            f"processes {r.leaked_processes}, shm {r.leaked_shm}, exit {r.exit_code}"
        )
        for d in r.lost_details[:10]:
            print(f"  lost: {d}")
        bad |= bool(lost or r.leaked_blocks or r.leaked_processes or r.leaked_shm or r.exit_code)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
