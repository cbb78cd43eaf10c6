"""What a router and a mesh engine say to each other: one dataclass per message.

Router to mesh: `AddRequest`, `Abort`, `StatsQuery`, `Ping`. Mesh to router: `MeshInfo` once
after the handshake, then `Added` or `Refused` for each `AddRequest`, `Output` as requests
produce text, `StatsReply`, `Pong`.
"""

from __future__ import annotations

from dataclasses import dataclass

from muxserve.client.protocol import MeshStats
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelLimits:
    """What the engine decided for one model (the router tokenizes and checks with these)."""

    dtype: str
    max_model_len: int


@dataclass(frozen=True)
class MeshInfo:
    """The mesh introduces itself: which process, on which host, serving what."""

    mesh: str
    pid: int
    node: str
    models: dict[str, ModelLimits]


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    model: str
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Added:
    request_id: str


@dataclass(frozen=True)
class Refused:
    """The engine refused the request; `kind` names the RequestError subclass to raise."""

    request_id: str
    kind: str
    message: str
    param: str | None
    retry_after: int = 1  # a QueueFullError's


@dataclass(frozen=True)
class Output:
    output: RequestOutput


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class StatsQuery:
    seq: int


@dataclass(frozen=True)
class StatsReply:
    seq: int
    stats: MeshStats


@dataclass(frozen=True)
class Ping:
    seq: int


@dataclass(frozen=True)
class Pong:
    seq: int
    engine_running: bool  # the engine's loop is alive (the process answering is not enough)
    degraded: dict[str, str]  # models whose workers restart, and why
