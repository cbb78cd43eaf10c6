"""A workload trace: one JSON object per line, each a request and when it arrives.

    {"arrival_s": 0.42, "model": "llama-demo", "prompt": "...", "prompt_len": 57, "max_tokens": 64}

An optional first line `{"meta": {...}}` records how the trace was made (readers skip it;
`nominal_duration_s` there is the span the arrival process covers).

`import_conversations` makes a trace from a conversation dump the user has downloaded
(ShareGPT's JSON, LMSYS-Chat-1M's JSON Lines): nothing is fetched here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TraceEntry:
    """One request of a trace."""

    arrival_s: float  # seconds from the start of the run
    model: str  # the `model` field of the request
    prompt: str
    prompt_len: int  # prompt tokens the generator aimed at (the server's count may differ)
    max_tokens: int  # output tokens asked for


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order, and what made them."""

    entries: tuple[TraceEntry, ...]
    meta: dict[str, Any]

    @property
    def duration_s(self) -> float:
        """The span the arrivals cover: the generator's duration, else the last arrival."""
        nominal = self.meta.get("nominal_duration_s")
        if isinstance(nominal, (int, float)) and nominal > 0:
            return float(nominal)
        return max((e.arrival_s for e in self.entries), default=0.0)

    @property
    def rate(self) -> float:
        """Mean offered load in requests/s."""
        span = self.duration_s
        return len(self.entries) / span if span > 0 else float("inf")

    def models(self) -> list[str]:
        """Model names: the generator's order (most popular first), then by first appearance."""
        seen = dict.fromkeys(e.model for e in self.entries)
        listed = [m for m in self.meta.get("models", []) if m in seen]
        return listed + [m for m in seen if m not in listed]

    def head(self, n: int | None) -> Trace:
        """The first `n` requests (all of them for None)."""
        if n is None or n >= len(self.entries):
            return self
        return Trace(self.entries[:n], self.meta)

    def at_rate(self, rate: float) -> Trace:
        """The same requests with arrival times scaled so the mean rate is `rate` req/s.

        Every feature of the arrival process (bursts, ramps) keeps its shape, compressed or
        stretched in time: the way the MuxServe paper sweeps rates over one workload.
        """
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        factor = self.rate / rate
        entries = tuple(replace(e, arrival_s=e.arrival_s * factor) for e in self.entries)
        meta = {**self.meta, "nominal_duration_s": self.duration_s * factor, "rate": rate}
        return Trace(entries, meta)


def write_trace(path: str | Path, entries: Sequence[TraceEntry], meta: dict[str, Any]) -> None:
    """Write a trace as JSONL, the meta line first."""
    lines = [json.dumps({"meta": meta})]
    lines += [json.dumps(asdict(e), ensure_ascii=False) for e in entries]
    Path(path).write_text("\n".join(lines) + "\n")


def read_trace(path: str | Path) -> Trace:
    """Read a JSONL trace; a bad line is a ValueError naming the file and line."""
    p = Path(path)
    entries: list[TraceEntry] = []
    meta: dict[str, Any] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if "meta" in obj:
                meta = dict(obj["meta"])
                continue
            entries.append(
                TraceEntry(
                    arrival_s=float(obj["arrival_s"]),
                    model=str(obj["model"]),
                    prompt=str(obj["prompt"]),
                    prompt_len=int(obj.get("prompt_len", 0)),
                    max_tokens=int(obj["max_tokens"]),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}:{n}: not a trace entry ({e!r})") from e
    entries.sort(key=lambda e: e.arrival_s)
    return Trace(tuple(entries), meta)


# ---- importing a conversation dump (ShareGPT, LMSYS-Chat-1M) ---------------------------------

# the speakers' names in the dumps, by what they are
ROLES = {
    **dict.fromkeys(("human", "user"), "user"),
    **dict.fromkeys(("gpt", "chatgpt", "bard", "bing", "assistant", "model"), "assistant"),
    "system": "system",
}


class TraceImportError(ValueError):
    """A conversation dump that cannot be imported; the message names the file (and record)."""


@dataclass(frozen=True)
class Conversation:
    """One record of a conversation dump: its position, its model (LMSYS) and its turns."""

    record: int  # 1-based: the line of a JSONL file, the element of a JSON list
    model: str | None
    turns: tuple[tuple[str, str], ...]  # (role: "user" | "assistant" | "system", text)
    timestamp: float | None = None  # `tstamp` / `timestamp` where the dump has one

    def first_exchange(self) -> tuple[str, str] | None:
        """The first user turn and the assistant's reply right after it (None if none)."""
        for (role, text), (next_role, reply) in zip(self.turns, self.turns[1:], strict=False):
            if role == "user" and next_role == "assistant":
                return text, reply
        return None


def read_conversations(path: str | Path, limit: int | None = None) -> list[Conversation]:
    """The records of a conversation dump, the first `limit` of them (all for None).

    Two shapes, told apart per record, in either container (a JSON list, or JSON Lines):
    ShareGPT (`{"conversations": [{"from": "human", "value": ...}, ...]}`) and LMSYS-Chat-1M
    (`{"model": ..., "conversation": [{"role": "user", "content": ...}, ...]}`). A missing or
    unreadable file, a malformed record or an empty dump raises `TraceImportError` naming the
    file and the record.
    """
    p = Path(path)
    if not p.is_file():
        raise TraceImportError(f"{p}: no such conversation dump (download it yourself: see --help)")
    if limit is not None and limit < 1:
        raise TraceImportError(f"{p}: the record limit must be at least 1, got {limit}")
    out: list[Conversation] = []
    for record, raw in _records(p):
        out.append(_conversation(p, record, raw))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TraceImportError(f"{p}: no conversations in the file")
    return out


def _records(p: Path) -> Iterator[tuple[int, Any]]:
    """(1-based record number, parsed JSON) of a JSON list or of JSON Lines, streamed for the
    latter (LMSYS-Chat-1M is gigabytes)."""
    try:
        with p.open("rb") as f:
            head = f.read(4096).lstrip()
    except OSError as e:
        raise TraceImportError(f"{p}: cannot read the conversation dump ({e})") from e
    if head.startswith(b"["):
        try:
            data = json.loads(p.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TraceImportError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise TraceImportError(f"{p}: expected a JSON list of conversations")
        yield from enumerate(data, 1)
        return
    with p.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TraceImportError(f"{p}: record {line_no} is not valid JSON ({e})") from e


def _conversation(p: Path, record: int, raw: Any) -> Conversation:
    where = f"{p}: record {record}"
    if not isinstance(raw, dict):
        raise TraceImportError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "conversations" in raw:  # ShareGPT
        items, role_key, text_key = raw["conversations"], "from", "value"
    elif "conversation" in raw:  # LMSYS-Chat-1M
        items, role_key, text_key = raw["conversation"], "role", "content"
    else:
        raise TraceImportError(
            f"{where}: neither a ShareGPT record ('conversations') nor an LMSYS one "
            f"('conversation'); keys: {sorted(raw)[:8]}"
        )
    if not isinstance(items, list):
        raise TraceImportError(f"{where}: the conversation is not a list of turns")
    turns = []
    for i, turn in enumerate(items, 1):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        text = turn.get(text_key) if isinstance(turn, dict) else None
        if not isinstance(role, str) or not isinstance(text, str):
            raise TraceImportError(
                f"{where}, turn {i}: expected {{{role_key!r}: str, {text_key!r}: str}}"
            )
        kind = ROLES.get(role.lower())
        if kind is None:
            raise TraceImportError(f"{where}, turn {i}: unknown role {role!r}")
        turns.append((kind, text))
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise TraceImportError(f"{where}: 'model' is not a string")
    stamp = raw.get("tstamp", raw.get("timestamp"))
    if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, (int, float))):
        raise TraceImportError(f"{where}: the timestamp is not a number of seconds")
    return Conversation(record, model, tuple(turns), None if stamp is None else float(stamp))


def import_conversations(
    path: str | Path,
    models: Sequence[str],
    rate: float,
    *,
    tokenizer: Any = None,
    alpha: float = 1.0,
    cv: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
    max_total_len: int | None = None,
) -> tuple[list[TraceEntry], dict[str, Any]]:
    """A trace from a conversation dump: one request per conversation, its first user turn as
    the prompt and the length of the assistant's reply as `max_tokens`.

    - Lengths are tokens of `tokenizer` (a `tokenizers.Tokenizer`) or, without one,
      whitespace-separated words. Conversations without a user turn answered by the assistant,
      or longer than `max_total_len` (prompt + reply), are skipped and counted in the meta.
    - Models: where the records name models (LMSYS), the dump's models ranked by how many
      conversations they have map onto `models` in order (most popular first); conversations
      of models ranked past `len(models)` are skipped. Where no record names one (ShareGPT),
      each conversation goes to a served model drawn with weights (i + 1) ** -alpha.
    - Arrivals: where every kept record has a timestamp, their spacings, scaled so the mean
      rate is `rate`; else, per model, a gamma renewal process of coefficient of variation
      `cv` (1: Poisson) at its share of `rate`, seeded by (`seed`, model index).

    Raises `TraceImportError` naming the file for a bad dump, one with a record that names a
    model beside records that do not, or one that leaves no request.
    """
    if not models:
        raise ValueError("importing a trace needs at least one served model")
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be positive, got {rate} and {cv}")
    p = Path(path)
    conversations = read_conversations(p, limit)
    named = [c for c in conversations if c.model is not None]
    if named and len(named) != len(conversations):
        first = next(c for c in conversations if c.model is None)
        raise TraceImportError(
            f"{p}: record {first.record} names no model while record {named[0].record} "
            f"does ({named[0].model!r}): a dump is either all LMSYS or all ShareGPT"
        )

    def length(text: str) -> int:
        if tokenizer is None:
            return len(text.split())
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    skipped = {"no_exchange": 0, "too_long": 0, "empty": 0, "unmapped_model": 0}
    kept: list[tuple[Conversation, str, int, int]] = []  # (conversation, prompt, lens)
    for c in conversations:
        exchange = c.first_exchange()
        if exchange is None:
            skipped["no_exchange"] += 1
            continue
        prompt, reply = exchange
        p_len, o_len = length(prompt), length(reply)
        if p_len == 0 or o_len == 0:
            skipped["empty"] += 1
        elif max_total_len is not None and p_len + o_len > max_total_len:
            skipped["too_long"] += 1
        else:
            kept.append((c, prompt, p_len, o_len))

    rng = np.random.default_rng([seed, len(models)])
    if named:
        counts = Counter(c.model for c, *_ in kept)
        ranked = sorted(counts, key=lambda m: -counts[m])  # stable: ties by first appearance
        model_map = {m: models[i] for i, m in enumerate(ranked[: len(models)])}
        skipped["unmapped_model"] = sum(counts[m] for m in ranked[len(models) :])
        assigned = [(k, model_map[k[0].model]) for k in kept if k[0].model in model_map]
    else:
        weights = np.array([(i + 1) ** -alpha for i in range(len(models))])
        picks = rng.choice(len(models), size=len(kept), p=weights / weights.sum())
        model_map = {}
        assigned = [(k, models[int(i)]) for k, i in zip(kept, picks, strict=True)]
    if not assigned:
        raise TraceImportError(
            f"{p}: none of the {len(conversations)} conversations read gives a request "
            f"(skipped: {', '.join(f'{n} {k}' for k, n in skipped.items() if n)})"
        )

    n = len(assigned)
    stamps = [k[0].timestamp for k, _ in assigned if k[0].timestamp is not None]
    span = max(stamps) - min(stamps) if len(stamps) == n else 0.0
    if span > 0:
        arrival_from = "timestamps"
        scale = (n / rate) / span  # n requests over n / rate seconds: mean rate `rate`
        times = [(s - min(stamps)) * scale for s in stamps]
    else:
        arrival_from = "gamma" if cv != 1 else "poisson"
        times = [0.0] * n
        k_shape = 1.0 / cv**2
        for i, model in enumerate(models):
            rows = [j for j, (_, m) in enumerate(assigned) if m == model]
            if not rows:
                continue
            model_rate = rate * len(rows) / n
            gaps = np.random.default_rng([seed, i]).gamma(k_shape, 1.0 / k_shape, len(rows))
            for j, t in zip(rows, np.cumsum(gaps) / model_rate, strict=True):
                times[j] = float(t)
    entries = [
        TraceEntry(round(t, 6), model, prompt, p_len, o_len)
        for t, ((_, prompt, p_len, o_len), model) in zip(times, assigned, strict=True)
    ]
    entries.sort(key=lambda e: (e.arrival_s, e.model))
    per_model = Counter(e.model for e in entries)
    meta: dict[str, Any] = {
        "source": str(p),
        "conversations_read": len(conversations),
        "requests": n,
        "skipped": skipped,
        "models": [m for m in models if per_model[m]],
        "requests_per_model": {m: per_model[m] for m in models},
        "model_map": model_map,
        "alpha": None if named else alpha,
        "arrivals": arrival_from,
        "cv": cv,
        "rate": rate,
        "seed": seed,
        "nominal_duration_s": n / rate,
        "lengths": "tokens" if tokenizer is not None else "words",
        "max_total_len": max_total_len,
        "tokenizer": tokenizer is not None,
    }
    return entries, meta
