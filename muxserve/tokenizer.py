"""A checkpoint's tokenizer: encode, decode, chat templates, streaming detokenization.

A thin wrapper on the `tokenizers` library, so the serving runtime does not need transformers.
It reads the files of a Hugging Face checkpoint folder the way transformers does (tokenizer.json,
tokenizer_config.json, chat_template.jinja, special_tokens_map.json, generation_config.json) and
gives the same token ids and the same rendered chat prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from muxserve.errors import CheckpointError, RequestError

# The named special tokens a chat template sees as variables (transformers' `special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Tokenizer:
    """Encode and decode text for one checkpoint, and render its chat template.

    Build it with `from_pretrained(folder)`. Ids match transformers' `AutoTokenizer` for the same
    folder. As in transformers 5, tokenizer.json's post-processor alone decides which special
    tokens `encode` adds (`add_bos_token` in tokenizer_config.json is not read), and byte-level
    BPE decoding never applies `clean_up_tokenization_spaces`.
    """

    def __init__(
        self,
        backend: _Backend,
        special_tokens: dict[str, str],
        chat_template: str | None,
        eos_token_ids: frozenset[int],
        bos_token_id: int | None,
        name: str = "<tokenizer>",
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens)  # e.g. {"bos_token": "<s>", ...}
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids  # every id that ends generation
        self.bos_token_id = bos_token_id
        self.name = name  # where it was read from, for error messages
        # ids of all tokens, added ones included: the range a model's sampler may produce
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Read the tokenizer files of a checkpoint folder; CheckpointError names a bad file."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a checkpoint folder")
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: no tokenizer.json (MuxServe needs a fast tokenizer)")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise CheckpointError(f"{file}: not a valid tokenizers file ({e})") from e
        backend.no_truncation()
        backend.no_padding()

        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        if not (folder / "generation_config.json").exists():
            generation = _read_json(folder / "config.json")  # what HF generate falls back to

        special: dict[str, str] = {}
        for key in SPECIAL_TOKEN_NAMES:
            token = _token_content(config.get(key, special_map.get(key)))
            if token is not None:
                special[key] = token

        bos = special.get("bos_token")
        bos_id = backend.token_to_id(bos) if bos is not None else None
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        eos_ids = set(_int_list(generation.get("eos_token_id")))
        eos = special.get("eos_token")
        eos_id = backend.token_to_id(eos) if eos is not None else None
        if eos_id is not None:
            eos_ids.add(eos_id)

        return cls(
            backend,
            special,
            _chat_template(folder, config),
            frozenset(eos_ids),
            bos_id,
            name=str(folder),
        )

    # ---- text <-> ids ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the post-processor adds (BOS)."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; invalid or incomplete UTF-8 becomes U+FFFD."""
        text: str = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level BPE: its bytes as printable chars)."""
        tok: str | None = self._backend.id_to_token(token_id)
        return tok

    def backend_json(self) -> str:
        """The whole tokenizer as `tokenizer.json` text (what a grammar library reads)."""
        text: str = self._backend.to_str()
        return text

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (a special token, say), or None if it is not in the vocab."""
        tid: int | None = self._backend.token_to_id(token)
        return tid

    # ---- chat ----------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on.

        Rendered as transformers renders it (same sandbox, helpers and variables). Templates
        usually start with the BOS token themselves, so encode the result with
        `add_special_tokens=False`, as transformers does. `tools` and `documents` are passed
        to the template as they are, `chat_template` replaces the model's for this call, and
        `extra` adds variables (vLLM's chat_template_kwargs).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise RequestError(
                f"model at {self.name} has no chat template; send a plain prompt instead",
                "messages",
            )
        if not messages:
            raise RequestError("messages is empty", "messages")
        if not all(isinstance(m, dict) for m in messages):
            raise RequestError("each message must be an object with a role", "messages")
        # transformers drops None values: templates handle a missing key, not a literal None
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            variables: dict[str, Any] = {**self.special_tokens, **(extra or {})}
            variables.update(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
            )
            return _compile(template).render(**variables)
        except jinja2.TemplateError as e:
            raise RequestError(f"chat template rejected the messages: {e}", "messages") from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise RequestError(f"chat template failed on the messages: {e!r}", "messages") from e


class IncrementalDetokenizer:
    """Turns a request's output ids into text deltas as they are generated.

    Decodes only a short window per step, as vLLM does with its prefix/read offsets: the window
    is the last emitted tokens (context) plus the undecided ones. The context makes decoders
    that look at neighbours (SentencePiece's leading space) render new tokens as in the whole
    text; the first context is the end of the prompt. A delta never ends inside a multi-byte
    character: while the window ends in U+FFFD that tail is held back. For byte-level tokenizers
    the concatenation of all deltas (and `flush()`) equals `tokenizer.decode(output_ids)`.
    """

    CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first output tokens
    MAX_HELD_TOKENS = 32  # past this many undecided tokens, stop waiting (invalid bytes)

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[max(0, len(prompt_ids) - self.CONTEXT_TOKENS) :])
        context_text = tokenizer.decode(context, skip_special_tokens)
        if context_text.endswith(_REPLACEMENT):
            # the prompt ends inside a character: decode the output on its own instead
            context, context_text = [], ""
        self._window = context  # context tokens, then the undecided ones
        self._num_context = len(context)
        self._context_len = len(context_text)  # characters the context decodes to
        self._emitted = 0  # characters of the window past the context already emitted
        self.text = ""  # all output text emitted so far

    def step(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (possibly empty)."""
        self._window.extend(new_ids)
        text = self._tok.decode(self._window, self._skip)
        start = self._context_len + self._emitted
        held = len(self._window) - self._num_context
        if text.endswith(_REPLACEMENT) and held <= self.MAX_HELD_TOKENS:
            # emit the complete characters before the undecided tail; keep the window open
            stable = len(text.rstrip(_REPLACEMENT))
            delta = text[start:stable] if stable > start else ""
            self._emitted += len(delta)
        else:
            delta = text[start:]
            self._advance()
        self.text += delta
        return delta

    def flush(self) -> str:
        """Return whatever was held back (an incomplete character at the end of the output)."""
        if len(self._window) == self._num_context:
            return ""
        text = self._tok.decode(self._window, self._skip)
        delta = text[self._context_len + self._emitted :]
        self._advance()
        self.text += delta
        return delta

    def _advance(self) -> None:
        """All undecided tokens are emitted: they become the context of the next window."""
        del self._window[: self._num_context]
        self._num_context = len(self._window)
        self._context_len = len(self._tok.decode(self._window, self._skip))
        self._emitted = 0


# ---- helpers -------------------------------------------------------------------------------
def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from an optional file: {} when absent; CheckpointError when malformed."""
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return raw


def _token_content(value: object) -> str | None:
    """A special token as a string: configs write either the string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _int_list(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja wins over tokenizer_config.json."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' assistant-mask marker: its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own declaration style)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace`, refusing underscore attributes (as transformers does)."""

    def __setitem__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")
        super().__setitem__(name, value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Compile a chat template in transformers' sandbox (templates come from the Hub)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise RequestError(f"the model's chat template does not compile: {e}", "messages") from e
