"""An engine's models changing while it serves: a model added (asleep) or a drained one removed.

This is what lets a mesh change shape: the router moves a model to a mesh that did not list
it by adding it there (then waking it, within the mesh's weights budget), and takes it off
the old mesh once drained (docs/replanning.md). Every part of the engine that keeps a table
per model takes the model or lets it go here, under the engine's lock; the checkpoint is
read (validated, tokenizer) before the lock is taken.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from muxserve.config import ModelEntry
from muxserve.errors import ModelBusyError, ModelDoesNotFitError, UnknownModelError
from muxserve.executor.base import ModelSetExecutor, ModelSpec
from muxserve.model_descriptor import describe_entry
from muxserve.models.loader import validate_checkpoint
from muxserve.residency import ModelState
from muxserve.served_model import ServedModel
from muxserve.tokenizer import Tokenizer

if TYPE_CHECKING:
    from muxserve.engine import MuxEngine


def _reshapeable(engine: MuxEngine) -> ModelSetExecutor:
    ex = engine.executor
    if not isinstance(ex, ModelSetExecutor):
        raise ValueError(
            f"adding or removing a model while serving needs an executor that can (inline or "
            f"mps); this engine's {type(ex).__name__} cannot"
        )
    return ex


def add_model(engine: MuxEngine, entry: ModelEntry) -> ServedModel:
    """Add `entry`'s model to a running engine, asleep: nothing is loaded until it wakes.

    Raises ValueError if the engine serves a model of that name already or its executor
    cannot take models on, and ModelDoesNotFitError if its weights exceed the whole weights
    budget (it could never wake).
    """
    ex = _reshapeable(engine)
    if entry.name in engine.models:
        raise ValueError(f"model {entry.name!r} is served here already")
    eng = engine.config.engine
    hf, tok = validate_checkpoint(entry.path), Tokenizer.from_pretrained(entry.path)
    on_gpu = engine.device.type == "cuda"
    d = describe_entry(entry, hf, eng, on_gpu=on_gpu, eos_token_ids=tok.eos_token_ids)
    spec = replace(ModelSpec.of(d, entry.path), asleep=True)
    budget = eng.residency.weights_budget_bytes
    need = spec.estimated_weight_bytes()
    if budget is not None and need > budget:
        raise ModelDoesNotFitError(entry.name, need, budget, {})
    served = ServedModel(entry.name, Path(entry.path), hf, tok, d.dtype, d.max_model_len)
    with engine._lock:
        if entry.name in engine.models:
            raise ValueError(f"model {entry.name!r} is served here already")
        ex.add_model(spec)
        engine.scheduler.add_model(d.slot)
        engine._controls.add(entry.name, tok, hf.vocab_size)
        engine.residency.add(entry.name, entry.rate)
        engine.models = {**engine.models, entry.name: served}
        models = [*engine.config.models, entry.model_copy(update={"initial_state": "asleep"})]
        engine.config = engine.config.model_copy(update={"models": models})
    return served


def remove_model(engine: MuxEngine, model: str) -> None:
    """Remove an asleep model with no request waiting or running from a running engine.

    Raises UnknownModelError, ModelBusyError while it has requests, and ValueError while it
    is awake (put it to sleep first) or if it is the engine's last model.
    """
    ex = _reshapeable(engine)
    with engine._lock:
        if model not in engine.models:
            raise UnknownModelError(model, list(engine.models))
        busy = engine.scheduler.in_flight(model)
        if busy:
            raise ModelBusyError(model, busy)
        state = engine.residency.state(model)
        if state is not ModelState.ASLEEP:
            raise ValueError(f"model {model!r} is {state.value}: put it to sleep first")
        engine.scheduler.remove_model(model)
        ex.remove_model(model)
        engine._controls.forget(model)
        engine.residency.forget(model)
        engine.models = {n: m for n, m in engine.models.items() if n != model}
        models = [m for m in engine.config.models if m.name != model]
        engine.config = engine.config.model_copy(update={"models": models})
