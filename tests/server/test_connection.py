"""The connection under the app: a half-sent request cannot hold its connection, and what
aiohttp cannot parse is answered in the OpenAI shape with one log line."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from muxserve.server import ServerSettings
from tests.helpers.server import samples, value

FAST = ServerSettings(header_timeout=0.5, body_timeout=0.5, linger=0.2)
SLACK = 3.0  # seconds past a timeout before the test calls the connection held


async def exchange(client, data: bytes, deadline: float) -> tuple[bytes, float]:
    """Send `data` on a new connection and read until the server closes it; what came back,
    and the seconds that took. Fails when the server keeps it open past `deadline`."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    t0 = time.monotonic()
    writer.write(data)
    await writer.drain()
    try:
        got = await asyncio.wait_for(reader.read(), deadline)
    finally:
        writer.close()
    return got, time.monotonic() - t0


def split(response: bytes) -> tuple[str, dict[str, str], dict]:
    """Status line, headers (lower-case names) and JSON body of a raw HTTP/1.1 answer."""
    head, body = response.split(b"\r\n\r\n", 1)
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return status, headers, json.loads(body)


def test_half_sent_headers_are_closed_after_the_header_timeout(serve):
    async def body(client):
        return await exchange(
            client, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty", 0.5 + SLACK
        )

    got, took = serve(body, FAST)
    assert got == b""  # closed, with nothing to say: no request was made
    assert 0.4 <= took < 0.5 + SLACK


def test_a_half_sent_body_is_408_then_closed(serve):
    async def body(client):
        return await exchange(
            client,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": ',
            0.5 + 0.2 + SLACK,
        )

    got, took = serve(body, FAST)
    status, headers, payload = split(got)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert headers["connection"] == "close"
    assert payload == {
        "error": {
            "message": "the request body did not arrive within 0.5 s",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    assert 0.5 <= took < 0.5 + 0.2 + SLACK


BAD_CHUNK = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
)
LONG_HEADER = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
BROTLI = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)


@pytest.mark.parametrize(
    ("raw", "status", "message", "code"),
    [
        (
            BAD_CHUNK,
            400,
            "malformed HTTP request: Invalid character in chunk size",
            "malformed_request",
        ),
        (
            LONG_HEADER,
            400,
            "malformed HTTP request: a request line or header is over 8190 bytes",
            "malformed_request",
        ),
        (
            BROTLI,
            415,
            "the body's Content-Encoding cannot be decoded here; send it uncompressed, or "
            "gzip- or deflate-compressed",
            "unsupported_content_encoding",
        ),
    ],
    ids=["bad-chunk-size", "oversized-header", "content-encoding-br"],
)
def test_protocol_errors_are_openai_errors_with_one_log_line(
    serve, caplog, raw, status, message, code
):
    async def body(client):
        got = await exchange(client, raw, SLACK)
        metrics = await (await client.get("/metrics")).text()
        return got, metrics

    with caplog.at_level(logging.DEBUG):
        (got, _), metrics = serve(body)
    line, headers, payload = split(got)
    assert line.split()[1] == str(status)
    assert headers["content-type"] == "application/json"  # and closed: exchange() read to EOF
    assert payload == {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.getMessage()) for r in logged] == [
        ("muxserve.server.connection", f"{status} to 127.0.0.1: {message}")
    ]
    assert [r for r in caplog.records if r.exc_info] == []  # no traceback, at any level
    counted = {"route": "malformed", "status": str(status)}  # no middleware saw it
    assert value(samples(metrics), "muxserve_http_responses_total", **counted) == 1
