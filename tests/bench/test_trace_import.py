"""Importing ShareGPT / LMSYS-Chat-1M conversation dumps into traces: lengths, the models'
popularity ranks, arrivals at the target rate, and clear errors for bad dumps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from muxserve.bench.trace import (
    TraceImportError,
    import_conversations,
    read_conversations,
    read_trace,
)
from muxserve.bench.workload import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def sharegpt(n: int) -> list[dict[str, Any]]:
    """n ShareGPT records: conversation i asks i + 2 words and gets 2 * i + 3 back."""
    return [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": " ".join(["ask"] * (i + 2))},
                {"from": "gpt", "value": " ".join(["reply"] * (2 * i + 3))},
                {"from": "human", "value": "and a follow-up that is not used"},
            ],
        }
        for i in range(n)
    ]


def lmsys(models: list[str]) -> list[dict[str, Any]]:
    """One LMSYS record per entry of `models`, each a 3-word question and a 4-word answer."""
    return [
        {
            "conversation_id": f"x{i}",
            "model": m,
            "conversation": [
                {"role": "user", "content": "what is this"},
                {"role": "assistant", "content": "it is a test"},
            ],
            "turn": 1,
            "language": "English",
        }
        for i, m in enumerate(models)
    ]


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sharegpt_first_exchange_word_lengths_and_popularity(tmp_path: Path) -> None:
    dump = write_json(tmp_path / "sharegpt.json", sharegpt(400))
    entries, meta = import_conversations(dump, ["a", "b", "c"], rate=4.0, seed=1)
    assert len(entries) == 400 and meta["requests"] == 400
    by_prompt = {e.prompt: e for e in entries}
    e = by_prompt["ask ask ask ask ask"]  # conversation 3
    assert (e.prompt_len, e.max_tokens) == (5, 9)
    assert meta["lengths"] == "words" and meta["arrivals"] == "poisson"
    assert meta["model_map"] == {} and meta["alpha"] == 1.0
    # drawn with weights 1, 1/2, 1/3: about 218, 109, 73 of 400
    counts = Counter(e.model for e in entries)
    assert counts["a"] > counts["b"] > counts["c"] > 40
    assert meta["requests_per_model"] == dict(counts)
    # the same seed, the same trace
    assert import_conversations(dump, ["a", "b", "c"], rate=4.0, seed=1)[0] == entries
    assert import_conversations(dump, ["a", "b", "c"], rate=4.0, seed=2)[0] != entries


def test_arrivals_per_model_at_their_share_of_the_rate(tmp_path: Path) -> None:
    dump = write_jsonl(tmp_path / "lmsys.jsonl", lmsys(["m1"] * 3000 + ["m2"] * 1000))
    entries, meta = import_conversations(dump, ["a", "b"], rate=8.0, seed=0)
    assert meta["nominal_duration_s"] == 500.0  # 4000 requests at 8 req/s
    assert [e.arrival_s for e in entries] == sorted(e.arrival_s for e in entries)
    for model, share in (("a", 0.75), ("b", 0.25)):
        t = np.array([e.arrival_s for e in entries if e.model == model])
        gaps = np.diff(np.concatenate([[0.0], t]))
        assert gaps.mean() == pytest.approx(1 / (8.0 * share), rel=0.06)
        assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # Poisson: CV 1
    bursty, meta = import_conversations(dump, ["a", "b"], rate=8.0, cv=3.0, seed=0)
    t = np.array([e.arrival_s for e in bursty if e.model == "a"])
    gaps = np.diff(t)
    assert meta["arrivals"] == "gamma" and gaps.std() / gaps.mean() > 2.0


def test_lmsys_models_map_onto_served_models_by_rank(tmp_path: Path) -> None:
    # vicuna 5, koala 3, alpaca 2 (first seen before llama), llama 2, dolly 1
    names = ["koala", "vicuna", "alpaca", "vicuna", "llama", "koala", "vicuna", "alpaca"]
    names += ["dolly", "vicuna", "koala", "vicuna", "llama"]
    dump = write_jsonl(tmp_path / "lmsys.jsonl", lmsys(names))
    entries, meta = import_conversations(dump, ["big", "mid", "small"], rate=1.0)
    assert meta["model_map"] == {"vicuna": "big", "koala": "mid", "alpaca": "small"}
    assert meta["skipped"]["unmapped_model"] == 3  # llama 2, dolly 1
    assert Counter(e.model for e in entries) == {"big": 5, "mid": 3, "small": 2}
    assert meta["alpha"] is None
    assert all((e.prompt, e.prompt_len, e.max_tokens) == ("what is this", 3, 4) for e in entries)


def test_timestamps_are_kept_and_scaled_to_the_rate(tmp_path: Path) -> None:
    records = lmsys(["m"] * 5)
    for r, t in zip(records, [1000.0, 1001.0, 1003.0, 1004.0, 1010.0], strict=True):
        r["tstamp"] = t
    dump = write_jsonl(tmp_path / "arena.jsonl", records)
    entries, meta = import_conversations(dump, ["a"], rate=1.0)
    # 5 requests over 10 s in the dump; at 1 req/s over 5 s: half the spacing
    assert meta["arrivals"] == "timestamps"
    assert [e.arrival_s for e in entries] == [0.0, 0.5, 1.5, 2.0, 5.0]


def test_token_lengths_with_a_tokenizer_and_the_length_cap(
    tmp_path: Path, demo_models: dict[str, Path]
) -> None:
    tok = load_tokenizer(demo_models["llama-demo"])
    dump = write_json(tmp_path / "sharegpt.json", sharegpt(30))
    entries, meta = import_conversations(dump, ["a"], rate=1.0, tokenizer=tok, max_total_len=40)
    assert meta["lengths"] == "tokens" and meta["tokenizer"] is True
    for e in entries:
        assert e.prompt_len == len(tok.encode(e.prompt, add_special_tokens=False).ids)
        assert e.prompt_len + e.max_tokens <= 40
    assert meta["skipped"]["too_long"] == 30 - len(entries) > 0
    assert meta["conversations_read"] == 30


def test_conversations_without_an_answer_are_skipped_and_limit_reads_the_first(
    tmp_path: Path,
) -> None:
    records = sharegpt(5)
    records[1]["conversations"] = [{"from": "gpt", "value": "hello"}]  # no user turn
    records[2]["conversations"] = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "hi there"},
    ]  # no answer
    dump = write_json(tmp_path / "sharegpt.json", records)
    entries, meta = import_conversations(dump, ["a"], rate=1.0, limit=4)
    assert meta["conversations_read"] == 4
    assert meta["skipped"]["no_exchange"] == 2 and len(entries) == 2
    assert [c.record for c in read_conversations(dump, limit=2)] == [1, 2]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"no conversations in the file"),
        ("[]", r"no conversations in the file"),
        ('{"model": "m", "conversation": [}\n', r"lmsys\.jsonl: record 1 is not valid JSON"),
        (
            '{"model": "m", "conversation": []}\n\n[1, 2]\n',
            r"lmsys\.jsonl: record 3: expected a JSON object, got list",
        ),
        ('{"id": 1, "text": "hi"}\n', r"lmsys\.jsonl: record 1: neither a ShareGPT record"),
        (
            '{"model": "m", "conversation": "hi"}\n',
            r"record 1: the conversation is not a list of turns",
        ),
        (
            '{"model": "m", "conversation": [{"role": "user", "content": 5}]}\n',
            r"record 1, turn 1: expected \{'role': str, 'content': str\}",
        ),
        (
            '{"model": "m", "conversation": [{"role": "robot", "content": "x"}]}\n',
            r"record 1, turn 1: unknown role 'robot'",
        ),
        (
            '{"model": 3, "conversation": []}\n',
            r"record 1: 'model' is not a string",
        ),
        (
            '{"model": "m", "tstamp": "noon", "conversation": []}\n',
            r"record 1: the timestamp is not a number",
        ),
    ],
)
def test_bad_records_name_the_file_and_record(tmp_path: Path, content: str, message: str) -> None:
    dump = tmp_path / "lmsys.jsonl"
    dump.write_text(content)
    with pytest.raises(TraceImportError, match=message):
        import_conversations(dump, ["a"], rate=1.0)


def test_bad_dumps_as_a_whole(tmp_path: Path) -> None:
    with pytest.raises(TraceImportError, match=r"nowhere\.json: no such conversation dump"):
        import_conversations(tmp_path / "nowhere.json", ["a"], rate=1.0)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": []},')
    with pytest.raises(TraceImportError, match=r"broken\.json: not valid JSON"):
        read_conversations(broken)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*lmsys(["m"]), *sharegpt(1)])
    with pytest.raises(TraceImportError, match=r"mixed\.jsonl: record 2 names no model"):
        import_conversations(mixed, ["a"], rate=1.0)
    unanswered = write_jsonl(
        tmp_path / "unanswered.jsonl",
        [{"model": "m", "conversation": [{"role": "user", "content": "hi"}]}],
    )
    with pytest.raises(
        TraceImportError, match=r"unanswered\.jsonl: none of the 1 conversations .* no_exchange"
    ):
        import_conversations(unanswered, ["a"], rate=1.0)
    ok = write_json(tmp_path / "ok.json", sharegpt(2))
    with pytest.raises(ValueError, match="rate and cv must be positive"):
        import_conversations(ok, ["a"], rate=0.0)
    with pytest.raises(ValueError, match="at least one served model"):
        import_conversations(ok, [], rate=1.0)
    with pytest.raises(TraceImportError, match=r"ok\.json: the record limit must be at least 1"):
        read_conversations(ok, limit=0)


def test_gen_workload_from_trace(tmp_path: Path) -> None:
    dump = write_jsonl(tmp_path / "lmsys.jsonl", lmsys(["x", "y", "x", "x", "y", "z"]))
    out = tmp_path / "trace.jsonl"
    args = [sys.executable, str(ROOT / "scripts" / "gen_workload.py"), "--from-trace"]
    run = subprocess.run(
        [*args, str(dump), "--models", "a", "b", "--rate", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's muxserve
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 5 requests from 6 conversations" in run.stderr
    assert "skipped: 1 unmapped_model" in run.stderr
    assert "  a: 3 requests (from x)" in run.stderr
    trace = read_trace(out)
    assert Counter(e.model for e in trace.entries) == {"a": 3, "b": 2}
    assert trace.duration_s == 2.5 and trace.rate == 2.0
    assert trace.meta["source"] == str(dump)
    bad = subprocess.run(
        [*args, str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t2.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's muxserve
    )
    assert bad.returncode == 2
    assert "missing.jsonl: no such conversation dump" in bad.stderr
    assert not (tmp_path / "t2.jsonl").exists()
