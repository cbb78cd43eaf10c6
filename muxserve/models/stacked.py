"""Linears that read one input (q/k/v, gate/up), run as one product where their weights lie
as one matrix.

The modules keep their own parameters, named as the checkpoints name them, so loaders,
tensor-parallel sharding and `state_dict` see nothing new. The CPU loader lays each stack's
weights (and biases) out back to back in the weight arena (`weight_arena`), which makes them
the row blocks of one (sum of outputs, in) matrix; `Stacked` then multiplies by that matrix
once and splits the result with views. At one row a product has a fixed cost besides the
weight bytes it streams: measured on a 2-core EPYC, one thread, column-major weights, q/k/v of
512 x 512 each 204 -> 144 us as one product, gate/up of 1376 x 512 284 -> 246 us, 150M's
q/k/v (1024 + 2 x 256 rows of 1024) 366 -> 278 us. Where the weights do not lie so (loaded
on a GPU, a model built by hand), each linear runs on its own.

Only a few rows gain: at 1-2 rows one product is 0.60-0.91x the time of the parts apart, at 4-8
rows 0.94-1.04x, and from 16 rows on the fixed cost is lost in the work while 150M's stacked
gate/up (5632 x 1024) ran 1.02-1.04x slower (16 to 2,048 rows). So a stack runs as one product
for at most `STACK_ROWS` rows, and apart (on the same memory) for more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

STACK_ROWS = 8  # most input rows that run as one product (see above)


class Stacked:
    """`linears` (`nn.Linear`s, or column-parallel shards, of one input width) on one input.

    A plain object, not a module: the linears stay where the model registers them. It is
    bound (`bind`) to the stacked matrix where the weights are placed (the CPU loader's arena)
    and bound again where they move (`bind_stacks`); a call only compares the first weight's
    address with the bound one (~0.1 us, where building every weight's address took ~4 us, two
    stacks per layer per step) and binds again if it differs: a move nobody rebound after, or
    the copy a worker process unpickles. A weight replaced alone, not the first, is not seen:
    every move in the project moves a model's tensors together.
    """

    def __init__(self, *linears: nn.Module) -> None:
        self.linears = linears
        self.sizes = [int(w.shape[0]) for w in self.weights()]
        # the first linear's parameter dict (the module's own): a call skips Module.__getattr__
        self._first = cast("dict[str, Tensor]", linears[0]._parameters)
        self._at: int | None = None  # the first weight's address when bound; None: unbound
        self._stack: tuple[Tensor, Tensor | None] | None = None

    def weights(self) -> list[Tensor]:
        return [cast(Tensor, m.weight) for m in self.linears]

    def biases(self) -> list[Tensor]:
        """The linears' biases, where they have them."""
        biases = (getattr(m, "bias", None) for m in self.linears)
        return [b for b in biases if isinstance(b, Tensor)]

    def bind(self) -> None:
        """Look for the one matrix the weights lie as, where they lie now: where they are
        placed, and again after they move (a stale stack would multiply by the old memory
        and keep it alive)."""
        # both at once, after the look: a `_find` that raises leaves it unbound, not bound
        # to the new address with the old stack
        at, stack = self._first["weight"].data_ptr(), self._find()
        self._at, self._stack = at, stack

    def __call__(self, x: Tensor) -> list[Tensor]:
        """Each linear's output for `x` (..., in): one product, split, where the weights lie
        as one matrix and `x` has at most `STACK_ROWS` rows; else one product each."""
        if x.numel() > STACK_ROWS * x.shape[-1]:
            return [m(x) for m in self.linears]
        if self._first["weight"].data_ptr() != self._at:
            self.bind()  # unbound, or moved since: follow
        if self._stack is None:
            return [m(x) for m in self.linears]
        weight, bias = self._stack
        return list(F.linear(x, weight, bias).split(self.sizes, dim=-1))

    def _find(self) -> tuple[Tensor, Tensor | None] | None:
        if not all(type(m).forward is nn.Linear.forward for m in self.linears):
            return None  # e.g. a row-parallel shard: its forward does more than its product
        weight, biases = stack_of(self.weights()), self.biases()
        if weight is None or len(biases) not in (0, len(self.linears)):
            return None
        bias = stack_of(biases) if biases else None
        return None if biases and bias is None else (weight, bias)

    def __getstate__(self) -> dict[str, object]:
        # a copy in another process binds to its own memory
        return {**self.__dict__, "_at": None, "_stack": None}


def same_kind(parts: Sequence[Tensor]) -> bool:
    """Whether `parts` can stack: matrices of one width and dtype, or vectors of one dtype."""
    first = parts[0]
    return first.dim() in (1, 2) and all(
        p.dim() == first.dim() and p.shape[1:] == first.shape[1:] and p.dtype == first.dtype
        for p in parts
    )


def stack_of(parts: Sequence[Tensor]) -> Tensor | None:
    """The one tensor `parts` are consecutive row blocks of, as a view, or None.

    Matrices (out_i, in), each row-major or each column-major, or vectors: where they lie back
    to back in one storage, the (sum of out_i, in) matrix (the sum of lengths) whose blocks they
    are, with the first part's strides.
    """
    if not same_kind(parts):
        return None
    first = parts[0]
    size = first.element_size()
    storage = first.untyped_storage().data_ptr()
    if first.dim() == 1 or first.is_contiguous():
        row_bytes = size * (first.shape[1] if first.dim() == 2 else 1)
        strides = first.stride()
    else:  # column-major: the parts are column blocks of one row-major transpose
        total = sum(p.shape[0] for p in parts)
        if first.stride() != (1, total):
            return None
        row_bytes, strides = size, (1, total)
    ptr = first.data_ptr()
    for p in parts:
        if (
            p.data_ptr() != ptr
            or p.stride() != strides
            or p.untyped_storage().data_ptr() != storage
        ):
            return None
        ptr += p.shape[0] * row_bytes
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return first.as_strided(shape, strides)


def stacks_in(model: nn.Module) -> list[Stacked]:
    """Every `Stacked` a module of `model` holds (as an attribute), for the loader to lay out."""
    return [s for m in model.modules() for s in vars(m).values() if isinstance(s, Stacked)]


def bind_stacks(model: nn.Module) -> None:
    """Bind each of `model`'s stacks where its weights lie now: after placing or moving them."""
    for s in stacks_in(model):
        s.bind()


def stacked_tensors(model: nn.Module) -> list[list[Tensor]]:
    """The weights of each of `model`'s stacks, and their biases where they have them: the
    tensors `weight_arena.materialize_in_arena` lays out back to back."""
    out: list[list[Tensor]] = []
    for s in stacks_in(model):
        out.append(s.weights())
        if s.biases():
            out.append(s.biases())
    return out
