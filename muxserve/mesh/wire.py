"""Length-prefixed pickled messages over an asyncio stream, after a shared-secret handshake.

A mesh may listen on a cluster's network (Ray), and unpickling runs code, so nothing is
unpickled before the peer has proved it holds the router's token: the mesh sends a random
challenge, the router answers HMAC-SHA256(token, challenge), and the mesh closes the
connection on a wrong answer (as `multiprocessing.connection` does with its authkey).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import pickle
import struct

CHALLENGE_BYTES = 32
MAX_FRAME_BYTES = 64 << 20  # a longer frame is a broken peer, not a message
_LEN = struct.Struct("!I")


class HandshakeError(ConnectionError):
    """The peer does not hold the token (or is not a MuxServe mesh at all)."""


def new_token() -> str:
    """A fresh shared secret, as hex (it travels through argv-free channels: stdin, Ray)."""
    return os.urandom(32).hex()


def _digest(token: str, challenge: bytes) -> bytes:
    return hmac.new(bytes.fromhex(token), challenge, hashlib.sha256).digest()


async def prove(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str) -> None:
    """The connecting side: answer the mesh's challenge."""
    challenge = await reader.readexactly(CHALLENGE_BYTES)
    writer.write(_digest(token, challenge))
    await writer.drain()


async def verify(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str) -> None:
    """The listening side: challenge the peer; HandshakeError if it does not hold `token`."""
    challenge = os.urandom(CHALLENGE_BYTES)
    writer.write(challenge)
    await writer.drain()
    answer = await reader.readexactly(hashlib.sha256().digest_size)
    if not hmac.compare_digest(answer, _digest(token, challenge)):
        raise HandshakeError("the peer failed the handshake")


def encode(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def send(writer: asyncio.StreamWriter, message: object) -> None:
    """Queue one message; the caller drains when it needs back-pressure."""
    writer.write(encode(message))


async def receive(reader: asyncio.StreamReader) -> object:
    """The next message; asyncio.IncompleteReadError once the peer has gone."""
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"a {size}-byte frame is over the {MAX_FRAME_BYTES}-byte limit")
    return pickle.loads(await reader.readexactly(size))
