"""The engine's per-token logprobs in OpenAI's two shapes: legacy completions, and chat."""

from __future__ import annotations

from collections.abc import Sequence

from muxserve.request import TokenLogprobs
from muxserve.server.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from muxserve.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as text, special tokens included (a partial UTF-8 character shows as U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class CompletionLogprobsBuilder:
    """Builds `logprobs` for /v1/completions; `text_offset` runs on across streamed chunks."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.offset = 0  # characters of token text so far

    def add(self, logprobs: Sequence[TokenLogprobs]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in logprobs:
            text = token_text(self.tokenizer, lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            top: dict[str, float] = {}
            for t, v in lp.top:  # most likely first; tokens with the same text keep the first
                top.setdefault(token_text(self.tokenizer, t), v)
            out.top_logprobs.append(top or {text: lp.logprob})
        return out


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprobs]) -> ChatLogprobs:
    """`logprobs` of a chat choice: one entry per token with its `top_logprobs` alternatives."""
    content = []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        top = []
        for tid, value in lp.top:
            alt = token_text(tokenizer, tid)
            top.append(TopLogprob(token=alt, logprob=value, bytes=list(alt.encode())))
        content.append(
            ChatTokenLogprob(
                token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)
