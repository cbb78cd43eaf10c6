"""Server-sent events as OpenAI streams them: `data: {json}` per chunk, then `data: [DONE]`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web
from pydantic import BaseModel

from muxserve.output_processor import RequestOutput
from muxserve.server.errors import APIError
from muxserve.server.generation import Choice, Generation
from muxserve.server.responses import ErrorResponse, Usage

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell proxies not to hold chunks back
}


class SSEWriter:
    """Writes one streamed response; the headers go out with `start()`, after every check."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers=SSE_HEADERS)

    async def start(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, chunk: BaseModel) -> None:
        """One event; raises ConnectionResetError once the client has gone."""
        await self.response.write(b"data: " + chunk.model_dump_json().encode() + b"\n\n")

    async def error(self, err: APIError) -> None:
        """An error after the headers went out: an event with the OpenAI error body."""
        await self.send(ErrorResponse(error=err.info))

    async def done(self) -> web.StreamResponse:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response


ChunkFn = Callable[[Choice, RequestOutput], BaseModel | None]


async def stream_generation(
    request: web.Request,
    gen: Generation,
    chunk: ChunkFn,
    usage_chunk: Callable[[Usage], BaseModel] | None,
    first: Sequence[BaseModel] = (),
) -> web.StreamResponse:
    """Stream `gen` as SSE: `first`, then `chunk(choice, output)` per output (None: skip it),
    then the usage chunk when asked for, then [DONE].

    An abort or engine error ends the stream with an error event. A client that went away ends
    it quietly: the caller's `gen.close()` aborts what is left.
    """
    sse = SSEWriter(request)
    try:
        await sse.start()
        for c in first:
            await sse.send(c)
        completion_tokens = 0
        try:
            async for choice, out in gen.outputs():
                event = chunk(choice, out)
                if event is not None:
                    await sse.send(event)
                if out.finished:
                    completion_tokens += out.completion_tokens
        except APIError as e:
            await sse.error(e)
        else:
            if usage_chunk is not None:
                await sse.send(usage_chunk(Usage.of(gen.prompt_tokens, completion_tokens)))
        return await sse.done()
    except ConnectionResetError:
        return sse.response
