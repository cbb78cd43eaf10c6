"""The engine's logprobs in OpenAI's shapes (legacy completions, chat) and vLLM's
`prompt_logprobs`."""

from __future__ import annotations

from collections.abc import Sequence

from muxserve.request import TokenLogprobs
from muxserve.server.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)
from muxserve.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int, as_id: bool = False) -> str:
    """A token as text, special tokens included (a partial UTF-8 character shows as U+FFFD);
    with `as_id` (vLLM's return_tokens_as_token_ids) "token_id:N"."""
    if as_id:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


class CompletionLogprobsBuilder:
    """Builds `logprobs` for /v1/completions; `text_offset` runs on across streamed chunks."""

    def __init__(self, tokenizer: Tokenizer, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self.offset = 0  # characters of token text so far

    def _text(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id, self.as_ids)

    def add(
        self, logprobs: Sequence[TokenLogprobs], into: CompletionLogprobs | None = None
    ) -> CompletionLogprobs:
        """Entries for generated tokens: the top alternatives (the token itself at 0)."""
        out = into or CompletionLogprobs()
        for lp in logprobs:
            text = self._text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            top: dict[str, float] = {}
            for t, v in lp.top:  # most likely first; tokens with the same text keep the first
                top.setdefault(self._text(t), v)
            out.top_logprobs.append(top or {text: lp.logprob})
        return out

    def add_prompt(
        self, prompt_ids: Sequence[int], logprobs: Sequence[TokenLogprobs] | None
    ) -> CompletionLogprobs:
        """Entries for an echoed prompt: none for its first token, then each token's logprob
        with the top alternatives and the token itself (as vLLM)."""
        out = CompletionLogprobs()
        by_pos = list(logprobs or ())
        for i, tid in enumerate(prompt_ids):
            text = self._text(tid)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            lp = by_pos[i - 1] if 0 < i <= len(by_pos) else None
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in lp.top:
                top.setdefault(self._text(t), v)
            top.setdefault(text, lp.logprob)
            out.top_logprobs.append(top)
        return out


def chat_logprobs(
    tokenizer: Tokenizer, logprobs: Sequence[TokenLogprobs], as_ids: bool = False
) -> ChatLogprobs:
    """`logprobs` of a chat choice: one entry per token with its `top_logprobs` alternatives."""
    content = []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id, as_ids)
        top = []
        for tid, value in lp.top:
            alt = token_text(tokenizer, tid, as_ids)
            top.append(TopLogprob(token=alt, logprob=value, bytes=list(alt.encode())))
        content.append(
            ChatTokenLogprob(
                token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


def vllm_prompt_logprobs(
    tokenizer: Tokenizer, prompt_ids: Sequence[int], logprobs: Sequence[TokenLogprobs] | None
) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: logprob, rank,
    decoded token} for the token and its top alternatives."""
    out: PromptLogprobs = [None]
    for i, tid in enumerate(prompt_ids[1:]):
        lp = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(t): PromptLogprob(logprob=v, rank=r + 1, decoded_token=token_text(tokenizer, t))
            for r, (t, v) in enumerate(lp.top)
        }
        entry.setdefault(
            str(tid),
            PromptLogprob(
                logprob=lp.logprob, rank=lp.rank, decoded_token=token_text(tokenizer, tid)
            ),
        )
        out.append(entry)
    return out
