"""MuxEngine: several models on one device, one KV pool, one scheduler, one loop.

The loop is three calls — `schedule()` (jobs for idle workers), `executor.submit(jobs)`, and
`on_job_done()` for each result `executor.poll()` hands back as its job finishes — then the
outputs. It runs in the caller's thread (`step()`, `generate()`) or in a background thread
(`start()`) while an event loop adds requests and reads their streams.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from muxserve.client.protocol import WAKE_BUCKETS, ModelState, WakeStats
from muxserve.config import MuxConfig, load_config
from muxserve.errors import (
    ConfigError,
    EmptyPromptError,
    EngineStoppedError,
    InsufficientMemoryError,
    ModelBusyError,
    ModelDoesNotFitError,
    RequestError,
    UnknownModelError,
)
from muxserve.executor.base import ModelSpec, create_executor
from muxserve.executor.watchdog import JobDeadline
from muxserve.model_descriptor import describe_entry
from muxserve.models.loader import validate_checkpoint
from muxserve.output_processor import Completion, OutputSink, RequestOutput, TextState
from muxserve.request import FinishReason, Request
from muxserve.residency import ResidencyPolicy, ResidencySettings
from muxserve.runner.kv_pool import KVPool, PoolSizing
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, JobResult, Phase, SeqWork
from muxserve.scheduler.scheduler import ModelStats, Scheduler, SchedulerSnapshot
from muxserve.served_model import ServedModel
from muxserve.step_controls import RequestControls, StepControls
from muxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

POLL_S = 1.0  # longest a step waits for a result before it returns to its caller


AUTO_DEVICE_ENV = "MUXSERVE_AUTO_DEVICE"  # what `device: auto` means here; the CPU tests pin cpu


def resolve_device(name: str) -> torch.device:
    """The engine's device: `name`, or for "auto" `$MUXSERVE_AUTO_DEVICE`, else CUDA when a GPU
    is visible.

    GPUs are counted by NVML (`torch.cuda.device_count`), not `torch.cuda.is_available()`,
    which initialises CUDA: a process that does so before the mps executor starts its daemon
    can no longer become an MPS client (MPS attaches at CUDA's first initialisation).
    """
    if name == "auto":
        name = os.environ.get(AUTO_DEVICE_ENV, "").strip()
        if not name:
            return torch.device("cuda" if torch.cuda.device_count() > 0 else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"engine.device: {name!r} is not a device ({e})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(
                f"engine.device: {name!r}, but this machine has no CUDA device; use cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"engine.device: {name!r}, but this machine has {count} GPU(s)")
    return device


class MuxEngine:
    """Serves every model of a config from one process, one device and one KV pool."""

    def __init__(self, config: MuxConfig, progress: bool = False) -> None:
        self.config = config
        eng = config.engine
        self.device = resolve_device(eng.device)
        # Everything that can fail on bad input is checked before any memory is taken.
        self.models: dict[str, ServedModel] = {}
        slots, specs = [], []
        asleep = [m.name for m in config.models if m.initial_state == "asleep"]
        for m in config.models:
            hf, tok = validate_checkpoint(m.path), Tokenizer.from_pretrained(m.path)
            d = describe_entry(
                m, hf, eng, on_gpu=self.device.type == "cuda", eos_token_ids=tok.eos_token_ids
            )
            self.models[m.name] = ServedModel(
                m.name, Path(m.path), hf, tok, d.dtype, d.max_model_len
            )
            slots.append(d.slot)
            specs.append(replace(ModelSpec.of(d, m.path), asleep=m.name in asleep))
        self._budget = eng.residency.weights_budget_bytes
        self._check_budget(specs)
        # The executor loads the weights, then allocates the pool in what they leave (worker
        # processes map it: shared memory, CUDA IPC); the scheduler accounts its blocks.
        deadline = JobDeadline(eng.job_timeout_s, eng.job_timeout_per_token_s)
        self.executor = create_executor(
            eng.executor, specs, PoolSizing.of(eng), self.device, progress, deadline
        )
        self.pool: KVPool = self.executor.pool
        try:
            # on a CPU a share is a thread count, not a partition: admission would only
            # serialize the models (one stuck job would hold every other model back)
            self.scheduler = Scheduler.create(
                slots,
                self.pool.num_blocks,
                eng,
                sm_admission=self.device.type != "cpu",
                asleep=asleep,
            )
        except BaseException:
            self.executor.shutdown()
            raise
        self._released: list[str] = []  # finished requests the executor may forget
        self._lock = threading.RLock()  # guards the scheduler and the per-request state
        self._wake = threading.Condition(self._lock)
        self._texts: dict[str, TextState] = {}
        self._controls = StepControls(
            {n: m.tokenizer for n, m in self.models.items()},
            {n: m.config.vocab_size for n, m in self.models.items()},
        )
        self._controlled = 0  # open requests with per-step controls
        self._sinks: dict[str, OutputSink] = {}
        self._rng = random.Random(eng.seed)
        self._thread: threading.Thread | None = None
        self._running = False
        self._init_residency(asleep)

    @classmethod
    def from_config(cls, path: str | Path | MuxConfig, progress: bool = False) -> MuxEngine:
        config = path if isinstance(path, MuxConfig) else load_config(path)
        return cls(config, progress=progress)

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        model: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Tokenize and queue a request; raises a RequestError subclass, allocating nothing.

        Its outputs are kept until read with `stream()` (or by `generate()`).
        """
        return self._submit(model, prompt, params, request_id).request_id

    def _submit(
        self,
        model: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None,
        request_id: str | None,
    ) -> Request:
        if self._thread is not None and not self._running:
            raise EngineStoppedError("the engine loop is not running; see the server log")
        served = self.models.get(model)
        if served is None:
            raise UnknownModelError(model, list(self.models))
        params = params or SamplingParams()
        if isinstance(prompt, str):
            ids = served.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            bad = [
                t
                for t in ids
                if isinstance(t, bool)
                or not isinstance(t, int)
                or not 0 <= t < served.config.vocab_size
            ]
            if bad:
                raise RequestError(
                    f"prompt token ids must be integers in [0, {served.config.vocab_size}); "
                    f"got {bad[0]!r}",
                    "prompt",
                )
        if not ids:
            raise EmptyPromptError("the prompt is empty", "prompt")
        vocab = served.config.vocab_size
        outside = [t for t, _ in params.logit_bias if t >= vocab]
        if outside:
            raise RequestError(
                f"logit_bias: token id {outside[0]} is not in [0, {vocab})", "logit_bias"
            )
        controls = self._controls.make(model, params)
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        slot = self.scheduler.queues[model].slot
        req = Request(rid, model, ids, params, time.monotonic(), seed, slot.eos_token_ids)
        req.controls = controls
        sink = OutputSink()
        with self._lock:
            if self._states[model] is not ModelState.AWAKE:
                self._check_ever_fits(model)
            self.scheduler.add_request(req)
            self._controlled += controls is not None
            self._sinks[rid] = sink
            self._texts[rid] = TextState(req, served.tokenizer, sink)
            self._residency.on_request(model)
            if self._states[model] is ModelState.ASLEEP:
                self._start_waker(model)
            self._wake.notify()
        self.executor.wake()  # a loop waiting on running jobs may start this one now
        return req

    def abort(self, request_id: str) -> bool:
        """Abort a request; its blocks are freed now, or when its running job returns.

        Its unread outputs are dropped (a reader already inside `stream()` still gets the
        final "abort" output), so a caller that gives up on a request leaves nothing behind.
        """
        with self._lock:
            self._sinks.pop(request_id, None)
            req = self.scheduler.abort(request_id)
            if req is None:
                return False
            if req.is_finished:
                self._emit(req)
            return True

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield a request's outputs as they come; the last has `finished` set."""
        sink = self._sinks.get(request_id)
        if sink is None:
            raise KeyError(f"unknown request {request_id!r} (or its outputs were read already)")
        while True:
            out = await sink.get()
            if out.finished:
                self._sinks.pop(request_id, None)
            yield out
            if out.finished:
                return

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> int:
        """Start jobs for idle workers, then apply the results of jobs that finish.

        Waits (at most `POLL_S`) for a first result while any job runs, so a caller looping on
        `step()` starts each worker's next job as soon as its last one is done. Returns how
        many jobs finished (0: nothing ran, or nothing finished yet).
        """
        with self._lock:
            jobs = self.scheduler.schedule()
            running = self.scheduler.jobs_in_flight
            released, self._released = self._released, []
            controlled = self._prepare(jobs)
        if released:
            self.executor.release(released)
        if controlled:  # outside the lock: only this (the loop's) thread advances grammars
            self._controls.fill(controlled)
        if jobs:
            self.executor.submit(jobs)
        if not running:
            return 0
        results = self.executor.poll(POLL_S)
        self._apply(results)
        return len(results)

    def _prepare(self, jobs: Sequence[Job]) -> list[tuple[SeqWork, RequestControls, list[int]]]:
        """Note first admissions (for the queue-time metric); return the sampling steps of
        requests with per-step controls, with their output so far. Under the lock."""
        controlled: list[tuple[SeqWork, RequestControls, list[int]]] = []
        now = time.monotonic()
        for job in jobs:
            if job.phase is not Phase.PREFILL and not self._controlled:
                continue
            for s in job.seqs:
                req = self.scheduler.get(s.request_id)
                if req is None:
                    continue
                if req.scheduled_time is None:
                    req.scheduled_time = now
                if s.sample and req.controls is not None:
                    controlled.append((s, req.controls, req.output_token_ids))
        return controlled

    def _apply(self, results: Sequence[tuple[Job, JobResult]]) -> None:
        with self._lock:
            for job, result in results:
                for req in self.scheduler.on_job_done(job, result):
                    self._emit(req, result.error)

    def _emit(self, req: Request, error: str | None = None) -> None:
        text = self._texts.get(req.request_id)
        if text is None:
            return
        c = req.controls.constraint if req.controls is not None else None
        if c is not None and not req.is_finished and req.output_token_ids:
            if not c.advance(req.output_token_ids):  # a bug, or a grammar llguidance gave up on
                self.scheduler.finish(req.request_id, FinishReason.ERROR)
                error = f"structured output: the grammar refused a token ({c.error})"
            elif c.done:
                self.scheduler.finish(req.request_id, FinishReason.STOP)
        if text.update(req):
            self.scheduler.finish(req.request_id, FinishReason.STOP)
        if req.first_token_time is None and req.output_token_ids:
            req.first_token_time = time.monotonic()
        text.emit(req, error if req.finish_reason is FinishReason.ERROR else None)
        if req.is_finished:
            self._released.append(req.request_id)
            del self._texts[req.request_id]  # the sink stays until its reader takes the end
            self._controlled -= req.controls is not None
            self._changed.notify_all()  # a model may be idle now: a waiting wake may evict it

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        model: str | Sequence[str] | None = None,
    ) -> list[Completion]:
        """Offline: run prompts to completion and return them in order (like vLLM's LLM.generate).

        `model` is one served name for all prompts or one per prompt; default: the first model.
        """
        n = len(prompts)
        models = (
            [model or next(iter(self.models))] * n
            if model is None or isinstance(model, str)
            else list(model)
        )
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
        if len(models) != n or len(plist) != n:
            raise ValueError("give one model and one SamplingParams per prompt, or one for all")
        done: dict[str, Completion] = {}
        sinks = {}
        order = []
        for p, m, sp in zip(prompts, models, plist, strict=True):
            req = self._submit(m, p, sp, None)
            rid = req.request_id
            sinks[rid] = self._sinks[rid]
            done[rid] = Completion(rid, m, list(req.prompt_token_ids))
            order.append(rid)
        pending = set(order)
        while pending:
            if self._thread is None and not self.step() and not self.has_work():
                break
            if self._thread is not None:
                time.sleep(0.001)
            for rid in list(pending):
                for out in sinks[rid].drain():
                    done[rid].add(out)
                    if out.finished:
                        pending.discard(rid)
                        self._sinks.pop(rid, None)
        return [done[r] for r in order]

    # ---- background loop -----------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread (for the server)."""
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="muxserve-engine", daemon=True)
        self._thread.start()
        if self.config.engine.residency.idle_sleep_s is not None and self.executor.can_sleep:
            t = threading.Thread(target=self._sleep_idle, name="muxserve-idle", daemon=True)
            self._wakers[""] = t  # joined with the wakers
            t.start()

    def _loop(self) -> None:
        try:
            while self._running:
                with self._lock:
                    while self._running and not self.scheduler.has_runnable_work():
                        self._wake.wait(timeout=0.5)
                if self._running and not self.step():
                    time.sleep(0.0005)  # work exists but none can run yet (e.g. no blocks yet)
        except Exception as e:  # a bug, not bad input: fail loudly, leave nobody waiting
            log.exception("the engine loop failed; every open request ends with an error")
            self._fail_all(f"the engine loop failed: {type(e).__name__}: {e}")

    def _fail_all(self, error: str) -> None:
        """End every open request's stream with `error`; the loop is gone."""
        with self._lock:
            self._running = False
            for rid, text in list(self._texts.items()):
                text.fail(error)
                del self._texts[rid]

    def shutdown(self) -> None:
        """Stop the loop and abort whatever is left; every block ends free."""
        self._stop_wakers()
        if self._thread is not None:
            with self._lock:
                self._running = False
                self._wake.notify_all()
            self.executor.wake()  # a step waiting for worker results returns now
            self._thread.join()
            self._thread = None
        with self._lock:
            for rid in list(self._texts):
                self.abort(rid)
        while self.scheduler.jobs_in_flight:  # their results free the aborted requests' blocks
            self._apply(self.executor.poll(POLL_S))
        self.executor.shutdown()

    # ---- sleep and wake (docs/elastic.md) ---------------------------------------------------
    def _init_residency(self, asleep: Sequence[str]) -> None:
        res = self.config.engine.residency
        self._states = {
            n: ModelState.ASLEEP if n in asleep else ModelState.AWAKE for n in self.models
        }
        self._sleep_level = dict.fromkeys(asleep, 2)  # of each asleep model
        self._wake_stats = {n: WakeStats() for n in self.models}
        self._last_wake_s = dict.fromkeys(self.models, 0.0)
        self._changed = threading.Condition(self._lock)  # a state changed, a request ended
        self._residency = ResidencyPolicy(
            {m.name: m.rate for m in self.config.models},
            ResidencySettings(res.half_life_s, res.min_residency_s, res.idle_sleep_s),
            awake=[n for n in self.models if n not in asleep],
        )
        self._wakers: dict[str, threading.Thread] = {}
        self._stopping = False

    def _check_budget(self, specs: Sequence[ModelSpec]) -> None:
        """The models that start awake must fit the weights budget: fail before loading."""
        if self._budget is None:
            return
        awake = {s.name: s.estimated_weight_bytes() for s in specs if not s.asleep}
        if sum(awake.values()) > self._budget:
            listed = ", ".join(f"{n} {b / (1 << 20):.1f} MiB" for n, b in awake.items())
            raise InsufficientMemoryError(
                f"the models that start awake need {sum(awake.values()) / (1 << 20):.1f} MiB "
                f"of weights ({listed}); engine.residency.weights_budget_bytes is "
                f"{self._budget / (1 << 20):.1f} MiB: start some with initial_state: asleep"
            )

    def model_states(self) -> dict[str, ModelState]:
        """Every model's state now; any thread."""
        with self._lock:
            return dict(self._states)

    def wake_stats(self) -> dict[str, WakeStats]:
        with self._lock:
            return dict(self._wake_stats)

    def _known(self, model: str) -> None:
        if model not in self.models:
            raise UnknownModelError(model, list(self.models))

    def _check_can_sleep(self) -> None:
        if not self.executor.can_sleep:
            raise ValueError(
                f"sleep and wake need engine.executor: inline (this engine runs "
                f"{self.config.engine.executor!r}, whose workers cannot sleep yet)"
            )

    def sleep(self, model: str, level: int = 1) -> None:
        """Put `model` to sleep (see `EngineClient.sleep`); blocks while its weights move, so
        call it off the event loop. Raises ModelBusyError while it has requests in flight."""
        self._known(model)
        self._check_can_sleep()
        if level not in (1, 2):
            raise ValueError(
                f"sleep level must be 1 (weights to host memory) or 2 (dropped), got {level!r}"
            )
        with self._lock:
            self._settle(model)
            if self._states[model] is ModelState.ASLEEP:
                if level == 2 and self._sleep_level.get(model) == 1:
                    self.executor.sleep_model(model, 2)  # drop the host copy
                    self._sleep_level[model] = 2
                return
            busy = self.scheduler.in_flight(model)
            if busy:
                raise ModelBusyError(model, busy)
            self._begin_sleep(model)
        self._finish_sleep(model, level)

    def wake(self, model: str) -> float:
        """Wake `model` (see `EngineClient.wake`); returns the seconds its weights took to come
        back. Blocks while they move (call it off the event loop); other models keep running.
        Puts idle models to sleep to make room where the residency policy allows; raises
        ModelDoesNotFitError where it does not."""
        self._known(model)
        with self._lock:
            if self._settle(model) is ModelState.AWAKE:
                return 0.0
            self._check_can_sleep()
            victims = self._make_room(model)
            for v in victims:
                self._begin_sleep(v)
            self._states[model] = ModelState.WAKING
            self._changed.notify_all()
        level = self.config.engine.residency.sleep_level
        try:
            for v in victims:
                log.info("%s: put to sleep (level %d) to make room for %s", v, level, model)
                self._finish_sleep(v, level)
            t0 = time.perf_counter()
            self.executor.wake_model(model)
            took = time.perf_counter() - t0
        except BaseException:
            with self._lock:
                self._states[model] = ModelState.ASLEEP
                self._changed.notify_all()
            raise
        with self._lock:
            self._woke(model, took)
        self.executor.wake()  # the loop may start the model's jobs now
        return took

    def _settle(self, model: str) -> ModelState:
        """Wait (under the lock) until `model` is not half-way (waking, sleeping)."""
        deadline = time.monotonic() + self.config.engine.residency.wake_timeout_s
        while self._states[model] in (ModelState.WAKING, ModelState.SLEEPING):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{model}: still {self._states[model].value} after waiting")
            self._changed.wait(left)
        return self._states[model]

    def _begin_sleep(self, model: str) -> None:
        """Under the lock: no more jobs for `model`; its quota goes back to the pool."""
        self._states[model] = ModelState.SLEEPING
        self.scheduler.sleep_model(model)
        self._residency.on_asleep(model)
        self._changed.notify_all()

    def _finish_sleep(self, model: str, level: int) -> None:
        """Outside the lock: move the weights off the device, then mark `model` asleep."""
        self.executor.sleep_model(model, level)
        with self._lock:
            self._states[model] = ModelState.ASLEEP
            self._sleep_level[model] = level
            st = self._wake_stats[model]
            self._wake_stats[model] = replace(st, sleeps=st.sleeps + 1)
            self._changed.notify_all()
            if self.scheduler.queues[model].waiting:  # requests came while it was sleeping
                self._start_waker(model)

    def _woke(self, model: str, took: float) -> None:
        """Under the lock: `model` is awake; its waiting requests learn how long they waited."""
        self.scheduler.wake_model(model)
        self._states[model] = ModelState.AWAKE
        self._sleep_level.pop(model, None)
        self._residency.on_awake(model)
        self._last_wake_s[model] = took
        self._wake_stats[model] = _add_wake(self._wake_stats[model], took)
        now = time.monotonic()
        for req in self.scheduler.queues[model].waiting:
            req.wake_time = now - req.arrival_time
        self._changed.notify_all()
        self._wake.notify()

    def _held(self) -> dict[str, int]:
        """Device bytes each model's weights hold now (awake, or on their way in or out)."""
        return {
            n: self.executor.weight_bytes(n)
            for n, st in self._states.items()
            if st is not ModelState.ASLEEP
        }

    def _free_bytes(self, held: dict[str, int]) -> int | None:
        """Bytes free for weights; None: no limit (a CPU without a budget)."""
        if self._budget is not None:
            return self._budget - sum(held.values())
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        return None

    def _busy(self) -> set[str]:
        return {n for n in self.models if self.scheduler.in_flight(n)}

    def _make_room(self, model: str) -> list[str]:
        """Under the lock: the idle models to put to sleep so that `model` fits (the residency
        policy's choice), or ModelDoesNotFitError."""
        held = self._held()
        held.pop(model, None)
        free = self._free_bytes(held)
        need = self.executor.weight_bytes(model)
        if free is None:
            return []
        victims = self._residency.make_room(need, free, held, self._busy())
        if victims is None:
            raise ModelDoesNotFitError(model, need, max(free, 0), held)
        return victims

    def _check_ever_fits(self, model: str) -> None:
        """A request for a sleeping model whose weights exceed the whole budget: refuse it now
        rather than let it wait for room that never comes."""
        if self._budget is None:
            return
        need = self.executor.weight_bytes(model)
        if need > self._budget:
            raise ModelDoesNotFitError(model, need, self._budget, {})

    # ---- waking for requests -------------------------------------------------------------
    def _start_waker(self, model: str) -> None:
        """Under the lock: wake `model` in a thread of its own, for the requests that wait."""
        t = self._wakers.get(model)
        if self._stopping or (t is not None and t.is_alive()):
            return
        t = threading.Thread(
            target=self._wake_for_requests,
            args=(model,),
            name=f"muxserve-wake-{model}",
            daemon=True,
        )
        self._wakers[model] = t
        t.start()

    def _wake_for_requests(self, model: str) -> None:
        """Wake `model`; while it does not fit, wait for a model to go idle (or pass its
        minimum residency) and try again, up to `wake_timeout_s`; then its waiting requests
        end with the reason."""
        deadline = time.monotonic() + self.config.engine.residency.wake_timeout_s
        while True:
            with self._lock:
                if self._stopping or not self.scheduler.queues[model].waiting:
                    return  # nobody waits any more
            try:
                self.wake(model)
                return
            except ModelDoesNotFitError as e:
                with self._lock:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        waited = self.config.engine.residency.wake_timeout_s
                        self._fail_waiting(model, f"{e} (waited {waited:g} s for room)")
                        return
                    nxt = self._residency.next_eviction_in(self._busy())
                    self._changed.wait(min(left, nxt if nxt is not None else left))
            except Exception as e:  # a broken checkpoint, no memory: its requests fail
                log.exception("%s: waking it failed", model)
                with self._lock:
                    self._fail_waiting(model, f"waking {model} failed: {type(e).__name__}: {e}")
                return

    def _sleep_idle(self) -> None:
        """Put models idle for `idle_sleep_s` to sleep, without memory pressure (start())."""
        res = self.config.engine.residency
        assert res.idle_sleep_s is not None
        while True:
            with self._lock:
                self._changed.wait(res.idle_sleep_s / 4)
                if self._stopping:
                    return
                idle = [
                    m
                    for m in self._residency.idle_too_long(self._busy())
                    if self._states[m] is ModelState.AWAKE
                ]
            for m in idle:
                log.info("%s: idle for %g s, put to sleep", m, res.idle_sleep_s)
                with contextlib.suppress(ModelBusyError, TimeoutError):  # a request came
                    self.sleep(m, res.sleep_level)

    def _fail_waiting(self, model: str, error: str) -> None:
        """Under the lock: end every waiting request of `model` with `error`."""
        for req in list(self.scheduler.queues[model].waiting):
            self.scheduler.finish(req.request_id, FinishReason.ERROR)
            self._emit(req, error)

    def _stop_wakers(self) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        for t in list(self._wakers.values()):
            t.join(timeout=self.config.engine.residency.wake_timeout_s)

    # ---- introspection -------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        """True while the background loop started by `start()` is alive (for health checks)."""
        return self._running and self._thread is not None and self._thread.is_alive()

    def degraded(self) -> dict[str, str]:
        """Models that cannot run right now (their workers restart), with why; any thread."""
        return self.executor.degraded()

    def stats(self) -> dict[str, ModelStats]:
        with self._lock:
            return self.scheduler.stats()

    def snapshot(self) -> SchedulerSnapshot:
        """Every model's queues and blocks and the pool's totals, at one moment."""
        with self._lock:
            return self.scheduler.snapshot()

    def check_integrity(self) -> None:
        with self._lock:
            self.scheduler.check_integrity()

    def __enter__(self) -> MuxEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _add_wake(st: WakeStats, took: float) -> WakeStats:
    buckets = st.wake_buckets or (0,) * len(WAKE_BUCKETS)
    return replace(
        st,
        wakes=st.wakes + 1,
        wake_seconds=st.wake_seconds + took,
        wake_buckets=tuple(b + (took <= le) for b, le in zip(buckets, WAKE_BUCKETS, strict=True)),
    )
