"""`muxserve serve` as a real process: serves a plan, then SIGTERM/SIGINT exit 0, nothing left."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from muxserve.config import dump_config
from tests.helpers.server import demo_config
from tests.helpers.wait import wait_until

GRACE = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc: no psutil needed)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def request(
    port: int, method: str, path: str, body: dict | None = None, key: str | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, json.dumps(body) if body else None, headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def start(args: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "muxserve.cli",
            "serve",
            "--port",
            str(port),
            "--grace",
            str(GRACE),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if request(port, "GET", "/health")[0] == 200:
                return proc
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def refused(port: int) -> bool:
    """Whether nothing listens on the port any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def stream(port: int, body: dict, key: str | None, got: list[bytes], started: threading.Event):
    """POST a streamed completion; set `started` at its first SSE event (or its end), then
    append the whole body to `got`."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        r = conn.getresponse()
        data = b""
        while not data.endswith(b"\n\n") and (line := r.readline()):
            data += line
        started.set()
        got.append(data + r.read())
        conn.close()
    finally:
        started.set()


def stop_mid_stream(proc: subprocess.Popen, port: int, sig: int, key: str | None) -> str:
    """Start a long stream, send `sig`, and return the process's output once it exits 0."""
    got: list[bytes] = []
    started = threading.Event()
    body = {
        "model": "mistral-demo",
        "prompt": "Once",
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    reader = threading.Thread(target=stream, args=(port, body, key, got, started))
    reader.start()
    assert started.wait(timeout=60), "no first event from the stream"
    kids = children(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(sig)
    # no new connections once stopping: the listener closes at once, in-flight streams go on
    wait_until(lambda: refused(port), 10, "the listener to close")
    out, _ = proc.communicate(timeout=GRACE + 30)
    took = time.monotonic() - t0
    reader.join(timeout=10)
    assert proc.returncode == 0, out
    assert not [k for k in kids if alive(k)], "a child process outlived the server"
    assert took >= GRACE * 0.9  # the in-flight stream got its grace period...
    # ...and then its client a proper ending (an error event if it was cut short), not a reset
    assert got and got[0].endswith(b"data: [DONE]\n\n")
    return out


def test_serve_a_plan_then_sigterm(demo_models, tmp_path):
    config = demo_config(demo_models).model_dump(mode="json", exclude_none=True)
    config["engine"]["device"] = "cpu"  # a CPU host: each mesh is a process, GPUs ignored
    config["meshes"] = [
        {"name": "mesh-0", "gpus": [0], "models": [{"name": "llama-demo"}, {"name": "qwen-demo"}]},
        {"name": "mesh-1", "gpus": [1], "models": [{"name": "mistral-demo"}]},
    ]
    plan = tmp_path / "plan.yaml"
    from muxserve.config import parse_config

    dump_config(parse_config(config), plan)
    port = free_port()
    proc = start(["--config", str(plan), "--api-key", "k"], port)
    try:
        status, data = request(port, "GET", "/v1/models", key="k")
        assert status == 200
        assert [m["id"] for m in json.loads(data)["data"]] == [
            "llama-demo",
            "qwen-demo",
            "mistral-demo",
        ]
        assert request(port, "GET", "/v1/models")[0] == 401
        status, data = request(
            port,
            "POST",
            "/v1/completions",
            {"model": "qwen-demo", "prompt": "Hi", "max_tokens": 3},
            key="k",
        )
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] <= 3
        out = stop_mid_stream(proc, port, signal.SIGTERM, "k")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "2 meshes" in out and "launcher local" in out
    assert "stopped" in out


def test_serve_with_no_config_builds_the_demo_models_then_sigint(tmp_path):
    port = free_port()
    env = {**os.environ, "MUXSERVE_CACHE": str(tmp_path)}  # an empty cache: first start
    proc = start([], port, env)  # no --config: the demo models
    try:
        status, _ = request(
            port,
            "POST",
            "/v1/chat/completions",
            {
                "model": "llama-demo",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert status == 200
        out = stop_mid_stream(proc, port, signal.SIGINT, None)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "demo models: 100%" in out  # the progress bar of the first start
    assert sorted(p.name for p in (tmp_path / "demo-models").iterdir()) == [
        "llama-demo",
        "mistral-demo",
        "qwen-demo",
    ]
    assert "serving llama-demo, qwen-demo, mistral-demo on http://127.0.0.1:" in out


def test_port_in_use_is_a_clean_error(demo_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "muxserve.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert proc.returncode == 1
    assert "cannot serve on 127.0.0.1" in proc.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_api_key_is_refused_at_startup(how):
    """`--api-key "$KEY"` with KEY unset must not serve without auth: exit 2, before loading."""
    args = ["--api-key", ""] if how == "flag" else []
    env = {**os.environ, "MUXSERVE_API_KEY": ""} if how == "env" else None
    proc = subprocess.run(
        [sys.executable, "-m", "muxserve.cli", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert proc.returncode == 2
    assert "the API key is empty (--api-key or $MUXSERVE_API_KEY)" in proc.stderr
    assert "serving" not in proc.stderr
