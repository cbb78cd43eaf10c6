"""Stacked linears: one product where the weights lie as one matrix (laid out so by the CPU
loader), one each otherwise, the same outputs either way."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from muxserve.models.loader import load_model
from muxserve.models.sharding import load_rank_models
from muxserve.models.stacked import (
    STACK_ROWS,
    Stacked,
    stack_of,
    stacked_tensors,
    stacks_in,
)
from muxserve.models.weight_arena import column_major_weights, materialize_in_arena
from muxserve.parallel.layers import ColumnParallelLinear, RowParallelLinear

MakeCheckpoint = Callable[..., Path]


def arena_linears(
    shapes: list[tuple[int, int]], bias: bool, column_major: bool
) -> tuple[nn.Sequential, Stacked]:
    """Linears (out, in) laid out in an arena as one stack, filled with seeded values."""
    with torch.device("meta"):
        seq = nn.Sequential(*(nn.Linear(i, o, bias=bias) for o, i in shapes))
    stacked = Stacked(*seq)
    tensors = [stacked.weights(), *([stacked.biases()] if bias else [])]
    major = stacked.weights() if column_major else []
    materialize_in_arena(seq, column_major=major, stacks=tensors)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return seq, stacked


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_a_laid_out_stack_is_one_product_with_the_same_outputs(
    column_major: bool, bias: bool
) -> None:
    seq, stacked = arena_linears([(6, 4), (2, 4), (2, 4)], bias, column_major)
    found = stacked._find()
    assert found is not None
    weight, stacked_bias = found
    assert weight.shape == (10, 4) and (stacked_bias is not None) == bias
    assert torch.equal(weight, torch.cat([m.weight for m in seq]))
    if column_major:
        assert all(m.weight.stride() == (1, 10) for m in seq)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    outs = stacked(x)
    assert [tuple(o.shape) for o in outs] == [(3, 6), (3, 2), (3, 2)]
    for out, m in zip(outs, seq, strict=True):
        assert torch.allclose(out, m(x), atol=1e-6)


def test_many_rows_run_apart_on_the_same_memory() -> None:
    """Past `STACK_ROWS` rows the parts run one product each (the stacked one gains nothing
    there), with the same outputs."""
    seq, stacked = arena_linears([(6, 4), (2, 4)], bias=True, column_major=True)
    x = torch.randn(STACK_ROWS + 1, 4, generator=torch.Generator().manual_seed(7))
    outs = stacked(x)
    assert stacked._at is None  # never looked for the stack
    for out, m in zip(outs, seq, strict=True):
        assert torch.equal(out, m(x))
    few = stacked(x[:STACK_ROWS])
    assert stacked._stack is not None
    for out, m in zip(few, seq, strict=True):
        assert torch.allclose(out, m(x[:STACK_ROWS]), atol=1e-6)


def test_linears_apart_run_one_product_each() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 5)
    stacked = Stacked(a, b)
    assert stack_of(stacked.weights()) is None  # two allocations, not one matrix
    x = torch.randn(2, 4)
    out = stacked(x)
    assert torch.equal(out[0], a(x)) and torch.equal(out[1], b(x))
    assert stacked._stack is None


def test_a_bound_stack_is_not_looked_for_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound where its weights are placed, a call only compares the first weight's address:
    it looks for no stack (here: looking would fail)."""
    seq, stacked = arena_linears([(6, 4), (2, 4)], bias=True, column_major=True)
    stacked.bind()
    assert stacked._at == seq[0].weight.data_ptr() and stacked._stack is not None

    def no_search(parts: object) -> None:
        raise AssertionError("a bound stack looked again")

    monkeypatch.setattr("muxserve.models.stacked.stack_of", no_search)
    x = torch.randn(2, 4)
    outs = stacked(x)
    for out, m in zip(outs, seq, strict=True):
        assert torch.allclose(out, m(x), atol=1e-6)


def test_a_moved_stack_is_bound_again() -> None:
    """Weights copied elsewhere (here: each its own memory) make the call bind again and run
    apart, with the new values; the pickled copy a worker gets is unbound and binds to its
    own memory on its first call."""
    seq, stacked = arena_linears([(3, 4), (3, 4)], bias=False, column_major=True)
    x = torch.randn(2, 4)
    stacked(x)
    assert stacked._stack is not None
    with torch.no_grad():
        for m in seq:
            m.weight.data = m.weight.data.clone() * 2
    out = stacked(x)
    assert stacked._stack is None and stacked._at == seq[0].weight.data_ptr()
    assert torch.equal(out[1], seq[1](x))
    copy = pickle.loads(pickle.dumps(stacked))
    assert copy._at is None and copy._stack is None
    assert copy._first is copy.linears[0]._parameters  # the copy's own module, not the original
    assert torch.equal(copy(x)[1], copy.linears[1](x))
    assert copy._at == copy.linears[0].weight.data_ptr()


def test_column_parallel_shards_stack_and_row_parallel_ones_and_mixed_biases_never() -> None:
    with torch.device("meta"):
        cols = nn.Sequential(
            ColumnParallelLinear(4, 4, False, 2), ColumnParallelLinear(4, 4, False, 2)
        )
    materialize_in_arena(cols, stacks=[[m.weight for m in cols]])
    assert Stacked(*cols)._find() is not None  # its forward is nn.Linear's
    with torch.device("meta"):
        row = RowParallelLinear(4, 4, False, 1)
        plain = nn.Linear(4, 4, bias=False)
    assert Stacked(row, plain)._find() is None  # its forward all-reduces
    with torch.device("meta"):
        seq = nn.Sequential(nn.Linear(4, 4, bias=True), nn.Linear(4, 4, bias=False))
    materialize_in_arena(seq, stacks=[[m.weight for m in seq]])
    assert Stacked(*seq)._find() is None


def test_stack_of_refuses_parts_that_do_not_line_up() -> None:
    base = torch.arange(24.0)
    rows = [base[:8].view(2, 4), base[8:16].view(2, 4)]
    assert torch.equal(stack_of(rows), base[:16].view(4, 4))  # type: ignore[arg-type]
    assert stack_of([rows[1], rows[0]]) is None  # out of order
    assert stack_of([base[:8].view(2, 4), base[12:20].view(2, 4)]) is None  # a gap
    assert stack_of([base[:8].view(2, 4), base[8:14].view(2, 3)]) is None  # widths differ
    assert stack_of([base[:2], base[2:5]]) is not None  # vectors: (5,)
    assert stack_of([base[:8].view(2, 2, 2)]) is None


def test_bad_stacks_are_refused_by_the_arena() -> None:
    with torch.device("meta"):
        seq = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="one width"):
        materialize_in_arena(seq, stacks=[[seq[0].weight, seq[1].weight]])
    with torch.device("meta"):
        seq = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="column-major whole"):
        materialize_in_arena(
            seq, column_major=[seq[0].weight], stacks=[[seq[0].weight, seq[1].weight]]
        )
    with pytest.raises(ValueError, match="two stacks"):
        materialize_in_arena(seq, stacks=[[seq[0].weight, seq[1].weight], [seq[1].weight]])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_cpu_loader_stacks_q_k_v_and_gate_up(
    make_checkpoint: MakeCheckpoint, family: str
) -> None:
    """Every decoder layer's q/k/v (with Qwen2's biases) and gate/up are found as one
    matrix each; a stack taller than wide is column-major."""
    model, _ = load_model(make_checkpoint(family), torch.float32, "cpu")
    stacks = stacks_in(model)
    assert len(stacks) == 2 * model.config.num_layers
    for s in stacks:
        assert s._at == s.weights()[0].data_ptr() and s._stack is not None  # bound on load
        found = s._find()
        assert found is not None, s.linears
        weight, bias = found
        assert (bias is not None) == (s.linears[0].bias is not None)
        tall = weight.shape[1] <= weight.shape[0]
        assert (weight.stride() == (1, weight.shape[0])) == tall
    tall = column_major_weights(model, model.head_weight(), stacked_tensors(model))
    assert any(w is model.head_weight() for w in tall)


def test_shared_weights_are_bound_where_they_now_lie(make_checkpoint: MakeCheckpoint) -> None:
    """A rank's weights moved to shared memory (for its workers) keep their stacks, bound at
    the new addresses before any call, with the same outputs as the linears apart."""
    [(model, _)] = load_rank_models(make_checkpoint("llama"), torch.float32, torch.device("cpu"), 1)
    x = torch.randn(1, model.config.hidden_size)
    for s in stacks_in(model):
        assert s.weights()[0].is_shared()
        assert s._at == s.weights()[0].data_ptr() and s._stack is not None
        outs = s(x)
        for out, m in zip(outs, s.linears, strict=True):
            assert torch.allclose(out, m(x), atol=1e-6)
