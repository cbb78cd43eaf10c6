"""ModelRunner over one shared KVPool: prefill logits against Hugging Face, and `execute`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from muxserve.demo import DEMO_MODEL_NAMES
from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.kv.layout import KVLayout
from muxserve.models.hf_config import HFModelConfig
from muxserve.models.llama import LlamaForCausalLM
from muxserve.models.loader import load_model
from muxserve.runner.attention import BatchLayout, PagedAttention
from muxserve.runner.batch_layout import pad_tables
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_runner import ModelRunner
from muxserve.runner.sampler import sample
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult, SeqWork

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
HF_TOL = 1e-4  # acceptance criterion: float32 prefill logits vs transformers' eager forward
# 1536 bytes: 3 tokens of mistral-demo (head 64), 6 of llama-demo (32), 12 of qwen-demo (16)
BLOCK_BYTES = 2 * 64 * 4 * 3
NUM_BLOCKS = 900
GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Loaded:
    """One demo model: ours (float32) and transformers' (float32, eager attention)."""

    ours: LlamaForCausalLM
    config: HFModelConfig
    hf: torch.nn.Module


@pytest.fixture(scope="module")
def loaded(demo_models: dict[str, Path]) -> dict[str, Loaded]:
    out = {}
    for name, folder in demo_models.items():
        model, config = load_model(folder, torch.float32, CPU)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        out[name] = Loaded(model, config, hf)
    return out


@pytest.fixture(scope="module")
def windowed(demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """mistral-demo with a sliding window of 5 tokens, shorter than the prompts below."""
    folder = tmp_path_factory.mktemp("windowed") / "mistral-window-5"
    shutil.copytree(demo_models["mistral-demo"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 5}))
    model, parsed = load_model(folder, torch.float32, CPU)
    assert parsed.layer_sliding_windows == (5, 5, 5, 5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return Loaded(model, parsed, hf)


class Served:
    """All demo models on one KVPool, with block accounting and a runner each."""

    def __init__(self, loaded: dict[str, Loaded]) -> None:
        self.kv = KVPool(NUM_BLOCKS, BLOCK_BYTES, CPU)
        self.layouts = {
            name: KVLayout(
                m.config.num_layers, m.config.num_kv_heads, m.config.head_dim, 4, BLOCK_BYTES
            )
            for name, m in loaded.items()
        }
        quota = NUM_BLOCKS // len(loaded)
        self.blocks = BlockPool(NUM_BLOCKS, dict.fromkeys(loaded, quota))
        self.tables = BlockTables(self.blocks, self.layouts)
        self.runners = {
            name: ModelRunner(name, m.ours, m.config, self.kv, self.layouts[name], torch.float32)
            for name, m in loaded.items()
        }
        self._job_ids: Iterator[int] = iter(range(1_000_000))

    def work(
        self,
        model: str,
        rid: str,
        tokens: Sequence[int],
        start: int,
        *,
        sample: bool = True,
        params: SamplingParams = GREEDY,
        seed: int = 0,
        step: int = 0,
    ) -> SeqWork:
        """A sequence's chunk `tokens` at positions `start..`, its blocks covered first."""
        self.tables.cover(model, rid, start + len(tokens))
        return SeqWork(
            rid, tuple(tokens), start, self.tables.table(rid), sample, params, seed, step
        )

    def job(self, model: str, seqs: Sequence[SeqWork], phase: Phase = Phase.PREFILL) -> Job:
        return Job(next(self._job_ids), model, phase, tuple(seqs), sm_share=1.0)

    @torch.inference_mode()
    def logits(self, job: Job) -> torch.Tensor:
        """(T, vocab) logits of every token of the job, computed over the pool."""
        runner = self.runners[job.model]
        batch = BatchLayout.from_seqs(job.seqs, CPU)
        attention = PagedAttention(runner.cache, batch, runner.config.layer_sliding_windows)
        ids = torch.tensor([t for s in job.seqs for t in s.token_ids], dtype=torch.int64)
        hidden = runner.model(ids, batch.pos_of_token, attention)  # (T, hidden)
        return runner.model.compute_logits(hidden)

    def check(self) -> None:
        self.blocks.check_integrity()


@pytest.fixture
def served(loaded: dict[str, Loaded]) -> Served:
    return Served(loaded)


def prompt(n: int, seed: int, vocab: int = 1024) -> list[int]:
    return torch.randint(7, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(loaded: Loaded, tokens: Sequence[int]) -> torch.Tensor:
    return loaded.hf(torch.tensor([list(tokens)])).logits[0].float()  # (n, vocab)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---- prefill logits vs Hugging Face ----------------------------------------------------------
@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_prefill_logits_match_hf(served: Served, loaded: dict[str, Loaded], name: str) -> None:
    tokens = prompt(17, seed=1)
    logits = served.logits(served.job(name, [served.work(name, "p", tokens, 0)]))
    assert max_diff(logits, hf_logits(loaded[name], tokens)) < HF_TOL
    served.check()


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_prefill_in_two_chunks_matches_hf(
    served: Served, loaded: dict[str, Loaded], name: str
) -> None:
    tokens = prompt(19, seed=2)
    first = served.logits(served.job(name, [served.work(name, "p", tokens[:7], 0, sample=False)]))
    rest = served.logits(served.job(name, [served.work(name, "p", tokens[7:], 7)]))
    assert max_diff(torch.cat([first, rest]), hf_logits(loaded[name], tokens)) < HF_TOL


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_mixed_batch_in_one_job_matches_hf(
    served: Served, loaded: dict[str, Loaded], name: str
) -> None:
    cont = prompt(15, seed=3)
    served.logits(served.job(name, [served.work(name, "cont", cont[:6], 0, sample=False)]))
    prompts = {"long": prompt(21, seed=4), "one": prompt(1, seed=5), "mid": prompt(8, seed=6)}
    seqs = [
        served.work(name, "long", prompts["long"], 0),
        served.work(name, "cont", cont[6:], 6),  # continues from 6 cached tokens
        served.work(name, "one", prompts["one"], 0),
        served.work(name, "mid", prompts["mid"], 0),
    ]
    logits = served.logits(served.job(name, seqs)).split([21, 9, 1, 8])
    expected = [
        hf_logits(loaded[name], prompts["long"]),
        hf_logits(loaded[name], cont)[6:],
        hf_logits(loaded[name], prompts["one"]),
        hf_logits(loaded[name], prompts["mid"]),
    ]
    for got, want in zip(logits, expected, strict=True):
        assert max_diff(got, want) < HF_TOL
    served.check()


def test_models_sharing_the_pool_do_not_disturb_each_other(
    served: Served, loaded: dict[str, Loaded]
) -> None:
    """Every model prefills its first chunk, then every model its second: all match HF."""
    tokens = {name: prompt(16, seed=10 + i) for i, name in enumerate(DEMO_MODEL_NAMES)}
    firsts = {
        name: served.logits(served.job(name, [served.work(name, name, t[:10], 0, sample=False)]))
        for name, t in tokens.items()
    }
    for name, t in tokens.items():
        rest = served.logits(served.job(name, [served.work(name, name, t[10:], 10)]))
        got = torch.cat([firsts[name], rest])
        assert max_diff(got, hf_logits(loaded[name], t)) < HF_TOL, name
    # the three models' blocks are disjoint ids of the one pool
    ids = [served.tables.table(name).ravel() for name in DEMO_MODEL_NAMES]
    assert np.unique(np.concatenate(ids)).size == sum(i.size for i in ids)
    served.check()


def test_sliding_window_model_over_chunks_matches_hf(
    windowed: Loaded, loaded: dict[str, Loaded]
) -> None:
    served = Served({"win": windowed})
    tokens = prompt(20, seed=7)
    first = served.logits(
        served.job("win", [served.work("win", "w", tokens[:13], 0, sample=False)])
    )
    rest = served.logits(served.job("win", [served.work("win", "w", tokens[13:], 13)]))
    expected = hf_logits(windowed, tokens)
    assert max_diff(torch.cat([first, rest]), expected) < HF_TOL
    # the window really cuts the context: full attention gives other logits past 5 tokens
    assert max_diff(expected, hf_logits(loaded["mistral-demo"], tokens)) > 0.1


# ---- execute ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_execute_greedy_prefill_then_decodes_follow_hf(
    served: Served, loaded: dict[str, Loaded], name: str
) -> None:
    runner = served.runners[name]
    tokens = prompt(11, seed=20)
    chunk = tokens
    for step in range(4):
        start = len(tokens) - len(chunk)
        phase = Phase.PREFILL if step == 0 else Phase.DECODE
        job = served.job(name, [served.work(name, "g", chunk, start, step=step)], phase)
        result = runner.execute(job)
        assert result.error is None and result.job_id == job.job_id
        (out,) = result.outputs
        expected = int(hf_logits(loaded[name], tokens)[-1].argmax())
        assert out == SeqResult("g", expected)
        tokens = [*tokens, expected]
        chunk = [expected]
    served.check()


def test_execute_aligns_outputs_and_skips_non_sampling_sequences(
    served: Served, loaded: dict[str, Loaded]
) -> None:
    name = "qwen-demo"
    runner = served.runners[name]
    a, b, c = prompt(9, seed=30), prompt(5, seed=31), prompt(12, seed=32)
    hot = SamplingParams(temperature=0.8, top_k=50, logprobs=3)
    seqs = [
        served.work(name, "a", a[:4], 0, sample=False),  # a chunk that does not reach the end
        served.work(name, "b", b, 0, params=hot, seed=42, step=0),
        served.work(name, "c", c, 0, sample=False),
        served.work(name, "d", a, 0),  # greedy
    ]
    result = runner.execute(served.job(name, seqs))
    assert result.error is None
    assert [o.request_id for o in result.outputs] == ["a", "b", "c", "d"]
    assert result.outputs[0] == SeqResult("a", None)
    assert result.outputs[2] == SeqResult("c", None)

    ref_b, ref_a = hf_logits(loaded[name], b)[-1], hf_logits(loaded[name], a)[-1]
    assert result.outputs[3].token_id == int(ref_a.argmax())
    assert result.outputs[3].top_logprobs == ()
    # the sampled token is what the sampler draws from HF's logits with the same seed and step
    (expected,) = sample(ref_b[None], [seqs[1]]).to_results()
    got = result.outputs[1]
    assert got.token_id == expected.token_id
    assert got.logprob == pytest.approx(expected.logprob, abs=HF_TOL)
    assert [t for t, _ in got.top_logprobs] == [t for t, _ in expected.top_logprobs]
    assert len(got.top_logprobs) == 3


def test_execute_with_no_sampling_sequence_returns_no_tokens(served: Served) -> None:
    name = "llama-demo"
    seqs = [served.work(name, r, prompt(6, seed=i), 0, sample=False) for i, r in enumerate("xy")]
    job = served.job(name, seqs)
    assert served.runners[name].execute(job) == JobResult(
        job.job_id, (SeqResult("x", None), SeqResult("y", None))
    )


def test_execute_returns_an_error_instead_of_raising(served: Served) -> None:
    name = "mistral-demo"
    runner = served.runners[name]
    good = served.work(name, "ok", prompt(5, seed=40), 0)
    bad_table = good.block_table.copy()
    bad_table[0, 1, 0] = NUM_BLOCKS + 7  # no such block
    bad = SeqWork("bad", (3, 4, 5), 0, bad_table, True, GREEDY, 0, 0)
    job = served.job(name, [good, bad])
    result = runner.execute(job)
    assert result.job_id == job.job_id
    assert result.outputs == ()
    assert result.error is not None and result.error.startswith("IndexError: ")
    # the runner is still usable afterwards
    after = runner.execute(served.job(name, [served.work(name, "next", prompt(4, seed=41), 0)]))
    assert after.error is None and after.outputs[0].token_id is not None


def test_execute_reports_a_table_too_short_for_its_tokens(served: Served) -> None:
    name = "llama-demo"  # 6 tokens per block
    served.tables.cover(name, "short", 6)
    table = served.tables.table("short")  # 1 logical block: 6 of the 9 tokens
    seq = SeqWork("short", tuple(prompt(9, seed=50)), 0, table, True, GREEDY, 0, 0)
    result = served.runners[name].execute(served.job(name, [seq]))
    assert result.outputs == ()
    assert result.error is not None


# ---- block tables on the device ----------------------------------------------------------------
def test_device_tables_give_the_host_paths_greedy_tokens(loaded: dict[str, Loaded]) -> None:
    """A runner forced to keep its tables on the device (`DeviceTables`, here the CPU's), whose
    attention then reads the gathered padded tables, against the host path: the same greedy
    tokens through decodes that cross block boundaries, a preempted request re-admitted with a
    different table (`Job.fresh`), and a finished request's slot taken by a new one."""
    name = "llama-demo"  # 6 tokens per block
    host, dev = Served(loaded), Served(loaded)
    m = loaded[name]
    dev.runners[name] = ModelRunner(
        name, m.ours, m.config, dev.kv, dev.layouts[name], torch.float32, device_tables=True
    )
    assert host.runners[name].device_tables is None  # the CPU's default: the host's tables
    tokens = {"a": prompt(7, seed=60), "b": prompt(4, seed=61), "c": prompt(5, seed=62)}
    done: dict[str, int] = {}  # request -> tokens in the pool
    job_ids = iter(range(1000))

    def step(rids: Sequence[str], fresh: Sequence[str] = ()) -> None:
        """One job of `rids` on both runners (a prefill of whatever each has not computed)."""
        outs = []
        for s in (host, dev):
            seqs = [s.work(name, r, tokens[r][done.get(r, 0) :], done.get(r, 0)) for r in rids]
            phase = Phase.DECODE if all(len(w.token_ids) == 1 for w in seqs) else Phase.PREFILL
            job = Job(next(job_ids), name, phase, tuple(seqs), 1.0, tuple(fresh))
            result = s.runners[name].execute(job)
            assert result.error is None
            outs.append([o.token_id for o in result.outputs])
            store = s.runners[name].device_tables
            if store is not None:  # what it holds now is the host's tables, padded
                width = max(w.block_table.shape[0] for w in seqs)
                got = store.gather(store.update(seqs), width)  # nothing new to send
                want = pad_tables([w.block_table for w in seqs])
                np.testing.assert_array_equal(got.numpy(), want)
        assert outs[0] == outs[1]
        for r, t in zip(rids, outs[0], strict=True):
            done[r] = len(tokens[r])
            tokens[r] = [*tokens[r], t]

    step(["a", "b"], fresh=["a", "b"])
    for _ in range(4):  # "b" crosses into its second block, "a" into its third... soon
        step(["a", "b"])
    for s in (host, dev):  # "b" is preempted: its blocks go back, the runners keep nothing new
        s.tables.release("b")
    step(["c"], fresh=["c"])  # "c" takes blocks "b" had
    done.pop("b")
    step(["b", "a", "c"], fresh=["b"])  # "b" again: recomputed, its table a different one
    for _ in range(3):
        step(["a", "b", "c"])
    for s in (host, dev):  # "a" finishes; "d" takes its slot
        s.tables.release("a")
        s.runners[name].release(["a"])
    tokens["d"] = prompt(3, seed=63)
    step(["d", "b"], fresh=["d"])
    for _ in range(3):
        step(["b", "d", "c"])
    store = dev.runners[name].device_tables
    assert store is not None and len(store) == 3  # b, c, d
    # and each token is HF's greedy choice
    for r in "bcd":
        assert tokens[r][-1] == int(hf_logits(m, tokens[r][:-1])[-1].argmax())
    host.check()
    dev.check()
