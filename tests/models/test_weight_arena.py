"""load_model on the CPU: weights in one huge-page-advised mapping, equal to the old heap load,
writable, shared where tied, unmapped with the model, and still shardable and shareable."""

from __future__ import annotations

import gc
import itertools
import mmap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from muxserve.models import weight_arena
from muxserve.models.causal_lm import CausalLM
from muxserve.models.loader import _tensors, load_model, plan_checkpoint
from muxserve.models.registry import build_model
from muxserve.models.sharding import shard_model
from muxserve.models.stacked import stack_of, stacked_tensors
from muxserve.models.weight_arena import (
    ALIGN,
    HUGE_PAGE,
    SKEW,
    column_major_weights,
    materialize_in_arena,
)

MakeCheckpoint = Callable[..., Path]
FAMILIES = ("qwen3-zoo", "gemma2-zoo", "gemma3-zoo", "phi3-zoo", "mixtral-zoo", "qwen3-moe-zoo")


def heap_load(folder: Path, dtype: torch.dtype) -> CausalLM:
    """The loader's path before the arena: torch's allocator, then the same copies."""
    plan = plan_checkpoint(folder)
    with torch.device("meta"):
        model = build_model(plan.config)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    model.load_weights(_tensors(plan))
    return model


def mapping_of(ptr: int) -> tuple[int, int, list[str]] | None:
    """The (start, end, VmFlags) of this process's mapping holding address `ptr`."""
    start = end = -1
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            start, end = (lo, hi) if lo <= ptr < hi else (-1, -1)
        elif line.startswith("VmFlags:") and start >= 0:
            return start, end, line.split()[1:]
    return None


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_family_loads_exactly_as_on_the_heap(
    zoo_models: dict[str, Path], name: str, dtype: torch.dtype
) -> None:
    folder = zoo_models[name]
    ours, _ = load_model(folder, dtype, "cpu")
    before = heap_load(folder, dtype)
    got, want = dict(ours.named_parameters()), dict(before.named_parameters())
    assert got.keys() == want.keys()
    for key, p in want.items():
        assert got[key].dtype == dtype and torch.equal(got[key], p), key


def test_parameters_are_aligned_writable_views_of_one_mapping(
    make_checkpoint: MakeCheckpoint,
) -> None:
    folder = make_checkpoint("qwen2")  # tied embeddings
    model, _ = load_model(folder, torch.float32, "cpu")
    params = list(model.parameters())
    bases = {p.untyped_storage().data_ptr() for p in params}
    assert len(bases) == 1
    base = bases.pop()
    assert base % HUGE_PAGE == 0  # the kernel aligns a large anonymous mapping to its pages
    # the LM head (here the tied embedding) 32 bytes past a cache line's start, where MKL's
    # sgemm reads a wide matrix faster; every other parameter on one
    head = model.head_weight()
    assert head is model.model.embed_tokens.weight and head.data_ptr() % ALIGN == SKEW == 32
    # a stack (q/k/v, gate/up, their biases) is one block: the block starts on a line
    stacks = stacked_tensors(model)
    in_stack = {id(p) for stack in stacks for p in stack}
    blocks = [stack_of(stack) for stack in stacks]
    assert all(b is not None for b in blocks)
    blocks += [p for p in params if id(p) not in in_stack]
    assert all(b.data_ptr() % ALIGN == 0 for b in blocks if b is not head)
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in blocks)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap
    assert model.lm_head is None  # tied: one embedding serves both
    assert not any(p.requires_grad for p in params)
    w = model.model.layers[0].self_attn.q_proj.weight
    old = w[0, 0].item()
    w[0, 0] += 1.0  # weights are written in place (e.g. a loader's copy, a test's edit)
    assert w[0, 0].item() == old + 1.0


def test_an_untied_head_is_skewed_and_the_embedding_is_not(
    make_checkpoint: MakeCheckpoint,
) -> None:
    folder = make_checkpoint("llama")
    model, _ = load_model(folder, torch.float32, "cpu")
    assert model.lm_head is not None and model.head_weight() is model.lm_head.weight
    assert model.lm_head.weight.data_ptr() % ALIGN == SKEW
    assert model.model.embed_tokens.weight.data_ptr() % ALIGN == 0


def is_column_major(w: torch.Tensor) -> bool:
    return w.stride()[0] == 1 and w.shape[1] > 1


@pytest.mark.parametrize("tied", [False, True])
def test_tall_linear_weights_and_the_head_are_column_major_views(
    make_checkpoint: MakeCheckpoint, tied: bool
) -> None:
    """The matrices a batch-1 step multiplies by faster column-major are stored so (still
    (out, in) to every reader): a stack (q/k/v, gate/up) by its stacked shape, another linear
    by its own; wide ones and an untied embedding stay row-major."""
    folder = make_checkpoint("llama", tie_word_embeddings=tied)
    model, _ = load_model(folder, torch.float32, "cpu")
    stacked = {id(w): stack for stack in stacked_tensors(model) for w in stack}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    kinds = set()
    for m in linears:
        assert m.weight.shape == (m.out_features, m.in_features)
        stack = stacked.get(id(m.weight), [m.weight])
        tall = m.in_features <= sum(w.shape[0] for w in stack)
        kinds.add(tall)
        assert is_column_major(m.weight) == tall, m
        if not tall and len(stack) == 1:
            assert m.weight.is_contiguous()
    assert kinds == {False, True}  # both kinds are in the checkpoint
    head, embedding = model.head_weight(), model.model.embed_tokens.weight
    assert is_column_major(head) and head.data_ptr() % ALIGN == SKEW
    assert (embedding is head) == tied and is_column_major(embedding) == tied
    want = heap_load(folder, torch.float32)
    for (n, a), (_, b) in zip(model.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_column_major_takes_matrices_only_and_lists_each_weight_once() -> None:
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 5)
    with pytest.raises(ValueError, match="only matrices"):
        materialize_in_arena(lin, column_major=(lin.bias,))
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 3))
    tall, wide = model[0].weight, model[1].weight
    assert [id(w) for w in column_major_weights(model, head=tall)] == [id(tall)]
    assert [id(w) for w in column_major_weights(model, head=wide)] == [id(tall), id(wide)]
    assert materialize_in_arena(model, column_major=column_major_weights(model)) == HUGE_PAGE
    tall, wide = model[0].weight, model[1].weight
    assert tall.stride() == (1, 5) and wide.stride() == (5, 1)
    # the transposed block starts where a row-major one would: the weight's 60 bytes, then
    # its bias on the next line
    assert model[0].bias.data_ptr() - tall.data_ptr() == ALIGN


def test_the_mapping_is_advised_into_huge_pages_and_unmapped_with_the_model(
    make_checkpoint: MakeCheckpoint,
) -> None:
    if not (
        Path("/proc/self/smaps").exists()
        and Path("/sys/kernel/mm/transparent_hugepage").is_dir()
        and hasattr(mmap, "MADV_HUGEPAGE")
    ):
        pytest.skip("needs Linux's /proc/self/smaps and a kernel with transparent huge pages")
    folder = make_checkpoint("llama")
    model, _ = load_model(folder, torch.float32, "cpu")
    ptr = next(model.parameters()).data_ptr()
    found = mapping_of(ptr)
    assert found is not None
    start, end, flags = found
    assert "hg" in flags  # MADV_HUGEPAGE
    assert (end - start) % HUGE_PAGE == 0
    del model
    gc.collect()
    after = mapping_of(ptr)
    assert after is None or after[:2] != (start, end)


def test_a_kernel_refusing_the_advice_still_loads(
    make_checkpoint: MakeCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No MADV_HUGEPAGE on the platform: the mapping is used with its ordinary pages."""
    monkeypatch.delattr(weight_arena.mmap, "MADV_HUGEPAGE", raising=False)
    folder = make_checkpoint("llama")
    model, _ = load_model(folder, torch.float32, "cpu")
    want = heap_load(folder, torch.float32)
    for (n, a), (_, b) in zip(model.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_meta_buffers_get_cpu_memory_and_a_model_without_parameters_no_mapping() -> None:
    with torch.device("meta"):
        module = torch.nn.BatchNorm1d(3, affine=False)
    assert materialize_in_arena(module) == 0
    assert all(b.device.type == "cpu" for b in module.buffers())
    with torch.device("meta"):
        lin = torch.nn.Linear(5, 3)
    size = materialize_in_arena(lin)
    assert size == HUGE_PAGE and lin.weight.shape == (3, 5) and lin.bias.device.type == "cpu"
    assert lin.weight.data_ptr() == lin.weight.untyped_storage().data_ptr()
    assert lin.bias.data_ptr() - lin.weight.data_ptr() == ALIGN  # 60 bytes rounded up to 64
    with torch.device("meta"):
        lin = torch.nn.Linear(5, 3)
    assert materialize_in_arena(lin, skewed=(lin.weight,)) == HUGE_PAGE
    # the weight's 60 bytes after the 32 of skew take two lines; the bias starts on the next
    assert lin.weight.data_ptr() - lin.weight.untyped_storage().data_ptr() == SKEW
    assert lin.bias.data_ptr() - lin.weight.data_ptr() == 2 * ALIGN - SKEW


def test_shards_and_shared_memory_work_from_the_arena(make_checkpoint: MakeCheckpoint) -> None:
    """TP slices of arena weights equal slices of heap weights; share_memory moves them."""
    folder = make_checkpoint("llama")
    whole, _ = load_model(folder, torch.float32, "cpu")
    heap = heap_load(folder, torch.float32)
    for rank in range(2):
        shard = shard_model(whole, rank, 2, torch.device("cpu"))
        a = dict(shard.named_parameters())
        b = dict(shard_model(heap, rank, 2, torch.device("cpu")).named_parameters())
        for key in b:
            assert torch.equal(a[key], b[key]), (rank, key)
        # a CPU shard is laid out as a whole model is: its q/k/v and gate/up stacked
        stacks = stacked_tensors(shard)
        assert len(stacks) == 2 * shard.config.num_layers
        assert all(stack_of(stack) is not None for stack in stacks)
    whole.share_memory()
    for (n, a), (_, b) in zip(whole.named_parameters(), heap.named_parameters(), strict=True):
        assert a.is_shared() and torch.equal(a, b), n
