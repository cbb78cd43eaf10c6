"""The OpenAI-compatible HTTP server: every model of a config behind one aiohttp endpoint."""

from __future__ import annotations

from muxserve.server.app import create_app
from muxserve.server.context import ServerSettings

__all__ = ["ServerSettings", "create_app"]
