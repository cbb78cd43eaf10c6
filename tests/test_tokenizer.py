"""Tokenizer: parity with transformers, chat templates, streaming detokenization, bad folders."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from muxserve.errors import CheckpointError, RequestError
from muxserve.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "a",
    "Hello world",
    "The river ran quietly past the old mill.\n\nNew paragraph\twith a tab.",
    "   leading and trailing spaces   ",
    "naïve café, Zürich, São Paulo, Łódź, Ærø",
    "中文：今天天气很好。日本語のテキスト。한국어 문장.",
    "emoji 🙂🚀 and a family 👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "Русский текст и ελληνικά και עברית",
    "<|user|>\nhi<|end|>\n<|assistant|>\n",
    "not special: <|use and <|end| and |>",
    "<|bos|><|bos|>double bos",
    "numbers 3.14159 1024 2024-05-17 $19.99",
    "def f(x):\n    return x * 2  # code",
]

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Tell me about Zürich 🙂  "},
        {"role": "assistant", "content": "It is a city."},
        {"role": "user", "content": "中文呢？"},
    ],
    [{"role": "user", "content": "x", "name": None}],  # None values are dropped, as in HF
]


@pytest.fixture(scope="module", params=["llama-demo", "qwen-demo", "mistral-demo"])
def pair(request: pytest.FixtureRequest, demo_models: dict[str, Path]) -> tuple[Tokenizer, Any]:
    """Ours and transformers' tokenizer for one folder.

    transformers loads qwen-demo with its own Qwen2 class (which rebuilds the pipeline) and
    mistral-demo's template from chat_template.jinja: each is a different path to the same ids.
    """
    folder = demo_models[request.param]
    return Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tok(demo_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_models["llama-demo"])


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(file: Path, **changes: Any) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


# ---- parity with transformers --------------------------------------------------------------
def test_special_ids_and_vocab(pair: tuple[Tokenizer, Any]) -> None:
    ours, hf = pair
    assert ours.vocab_size == len(hf) == 1024
    assert ours.bos_token_id == hf.bos_token_id == 0
    assert ours.eos_token_ids == frozenset({1, 6})  # <|eos|> and <|end|> (generation_config)
    assert ours.special_tokens == hf.special_tokens_map


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair: tuple[Tokenizer, Any], add_special_tokens: bool) -> None:
    ours, hf = pair
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


def test_encode_adds_one_bos(tok: Tokenizer) -> None:
    assert tok.encode("hi")[0] == 0
    assert tok.encode("hi", add_special_tokens=False)[0] != 0
    assert tok.encode("<|user|>") == [0, 4]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair: tuple[Tokenizer, Any], skip: bool) -> None:
    ours, hf = pair
    rng = random.Random(0)
    sequences = [ours.encode(t) for t in TEXTS]
    sequences += [
        [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(50)
    ]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


def test_roundtrip(tok: Tokenizer) -> None:
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<|bos|>" + text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    pair: tuple[Tokenizer, Any], add_generation_prompt: bool
) -> None:
    ours, hf = pair
    for chat in CHATS:
        expected = hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(chat, add_generation_prompt) == expected


def test_chat_template_text(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": " Hi "}])
    assert text == "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:3] == [0, 4, tok.encode("\n", add_special_tokens=False)[0]]


def test_template_helpers_match_transformers(demo_models: dict[str, Path], tmp_path: Path) -> None:
    """namespace, loop controls, tojson, strftime_now and raise_exception behave as in HF."""
    folder = copy_folder(demo_models["llama-demo"], tmp_path / "m")
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}\n"
        "{% endfor %}{{ eos_token }}{{ strftime_now('%Y') | length }}"
        "{% if messages | length > 3 %}{{ raise_exception('too many: ' ~ messages | length) }}"
        "{% endif %}"
    )
    edit_json(folder / "tokenizer_config.json", chat_template=template)
    ours, hf = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "<b>é</b>"}, {"role": "skip"}, {"role": "a", "k": [1]}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False)
    with pytest.raises(RequestError, match="too many: 4") as e:
        ours.apply_chat_template([*chat, *chat[:1]])
    assert e.value.param == "messages"


def test_chat_template_rejects_unknown_role(tok: Tokenizer) -> None:
    with pytest.raises(RequestError, match="unknown role tool") as e:
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert e.value.param == "messages"


def test_chat_template_errors_are_request_errors(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = copy_folder(demo_models["llama-demo"], tmp_path / "m")
    edit_json(folder / "tokenizer_config.json", chat_template="{{ messages[0].content + 1 }}")
    tok = Tokenizer.from_pretrained(folder)
    with pytest.raises(RequestError, match="TypeError") as e:  # str + int inside the template
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert e.value.param == "messages"
    with pytest.raises(RequestError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(RequestError, match="object"):
        tok.apply_chat_template(["hi"])  # type: ignore[list-item]


def test_no_chat_template(demo_models: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_folder(demo_models["llama-demo"], tmp_path / "m")
    edit_json(folder / "tokenizer_config.json", chat_template=None)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template is None
    with pytest.raises(RequestError, match="no chat template") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.param == "messages"


def test_template_syntax_error(demo_models: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_folder(demo_models["mistral-demo"], tmp_path / "m")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(RequestError, match="does not compile"):
        Tokenizer.from_pretrained(folder).apply_chat_template([{"role": "user", "content": "x"}])


# ---- files -----------------------------------------------------------------------------------
def test_missing_tokenizer_json(demo_models: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_folder(demo_models["llama-demo"], tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("tokenizer.json", "{not json"),
        ("tokenizer.json", '{"model": 3}'),
        ("tokenizer_config.json", "["),
    ],
)
def test_bad_files_are_named(
    demo_models: dict[str, Path], tmp_path: Path, file: str, content: str
) -> None:
    folder = copy_folder(demo_models["llama-demo"], tmp_path / "m")
    (folder / file).write_text(content)
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        Tokenizer.from_pretrained(folder)


def test_eos_sources(demo_models: dict[str, Path], tmp_path: Path) -> None:
    """eos ids: the eos token plus generation_config.json's, else config.json's."""
    folder = copy_folder(demo_models["qwen-demo"], tmp_path / "m")
    edit_json(folder / "generation_config.json", eos_token_id=5)
    assert Tokenizer.from_pretrained(folder).eos_token_ids == {1, 5}
    (folder / "generation_config.json").unlink()
    edit_json(folder / "config.json", eos_token_id=[1, 3])
    assert Tokenizer.from_pretrained(folder).eos_token_ids == {1, 3}


def test_post_processor_decides_special_tokens(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """add_bos_token / add_eos_token do not override tokenizer.json, as in transformers 5."""
    folder = copy_folder(demo_models["llama-demo"], tmp_path / "m")
    edit_json(folder / "tokenizer_config.json", add_bos_token=False, add_eos_token=True)
    ours, hf = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.encode("hi") == hf.encode("hi") == [0, *ours.encode("hi", add_special_tokens=False)]
    edit_json(folder / "tokenizer.json", post_processor=None)
    edit_json(folder / "tokenizer_config.json", add_bos_token=True)
    ours, hf = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.encode("hi") == hf.encode("hi") == ours.encode("hi", add_special_tokens=False)


# ---- incremental detokenization ------------------------------------------------------------
def stream(
    tok: Tokenizer, prompt: Sequence[int], out: Sequence[int], rng: random.Random, skip: bool = True
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `out` in random chunks of 1-3 ids; return the deltas (flush last)."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(out):
        n = rng.randint(1, 3)
        deltas.append(detok.step(out[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_random_ids_equal_decode(tok: Tokenizer, skip: bool) -> None:
    """Random ids, half of them pieces of multi-byte characters: windows held and released."""
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 100
    rng = random.Random(1)
    for _ in range(600):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 8))]
        out = [
            rng.choice(partial) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randrange(1, 40))
        ]
        deltas, detok = stream(tok, prompt, out, rng, skip)
        assert "".join(deltas) == detok.text == tok.decode(out, skip_special_tokens=skip)


def test_incremental_gives_up_waiting_on_invalid_bytes(tok: Tokenizer) -> None:
    """A long run of bytes that never form a character is released, not held forever."""
    stray = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd")
    detok = IncrementalDetokenizer(tok, [0])
    deltas = [detok.step([stray]) for _ in range(100)]
    assert "".join(deltas) + detok.flush() == tok.decode([stray] * 100)
    assert sum(1 for d in deltas if d) >= 2  # released in pieces while streaming


def test_incremental_valid_text_never_splits_a_character(tok: Tokenizer) -> None:
    rng = random.Random(2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something."}])
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    for text in TEXTS[1:]:
        out = tok.encode(text, add_special_tokens=False)
        deltas, detok = stream(tok, prompt_ids, out, rng)
        assert not any("\ufffd" in d for d in deltas), (text, deltas)
        assert detok.text == tok.decode(out)  # == text, less the special tokens
    # one character split over three tokens comes out whole, in one delta
    ids = tok.encode("中", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, prompt_ids)
    assert [detok.step([i]) for i in ids] == [""] * (len(ids) - 1) + ["中"]


def test_incremental_emits_complete_characters_before_a_partial_one(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [0])
    *head, last = tok.encode("ab 中", add_special_tokens=False)
    assert detok.step(head) == "ab "
    assert detok.step([last]) == "中"


def test_flush_returns_the_incomplete_tail(tok: Tokenizer) -> None:
    partial = tok.encode("中", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tok, [0])
    assert detok.step(partial) == ""
    assert detok.flush() == tok.decode(partial) == "\ufffd"
    assert detok.flush() == ""
    assert detok.text == "\ufffd"


def test_special_tokens_in_output(tok: Tokenizer) -> None:
    out = tok.encode("hi<|end|>", add_special_tokens=False)
    kept = IncrementalDetokenizer(tok, [0], skip_special_tokens=False)
    dropped = IncrementalDetokenizer(tok, [0])
    assert "".join(kept.step([i]) for i in out) == "hi<|end|>"
    assert "".join(dropped.step([i]) for i in out) == "hi"


def test_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ids = tok.encode("中文", add_special_tokens=False)
    prompt, out = ids[:1], ids[1:]
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(detok.step([i]) for i in out) + detok.flush()
    assert text == tok.decode(out)


def test_incremental_decodes_a_short_window(tok: Tokenizer) -> None:
    """Per step, only a few recent tokens are decoded, however long the output."""
    sizes: list[int] = []
    decode = tok.decode

    class Counting(Tokenizer):
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            sizes.append(len(ids))
            return decode(ids, skip_special_tokens)

    counting = Counting.__new__(Counting)
    counting.__dict__.update(tok.__dict__)
    out = tok.encode(" ".join(TEXTS) * 5, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, tok.encode("prompt"))
    assert "".join(detok.step([i]) for i in out) + detok.flush() == tok.decode(out)
    assert len(out) > 1000 and max(sizes) <= 12
