"""MuxEngine: several models on one device, one KV pool, one scheduler, one loop.

The loop is three calls — `schedule()` (jobs for idle workers), `executor.submit(jobs)`, and
`on_job_done()` for each result `executor.poll()` hands back as its job finishes — then the
outputs. It runs in the caller's thread (`step()`, `generate()`) or in a background thread
(`start()`) while an event loop adds requests and reads their streams.
"""

from __future__ import annotations

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

from muxserve import roster
from muxserve.config import ModelEntry, MuxConfig, load_config
from muxserve.errors import (
    ConfigError,
    EmptyPromptError,
    EngineStoppedError,
    RequestError,
    UnknownModelError,
)
from muxserve.executor.base import POLL_S, ModelSpec, create_executor
from muxserve.executor.lifecycle import WorkerLifecycle
from muxserve.executor.watchdog import JobDeadline
from muxserve.model_descriptor import describe_entry
from muxserve.model_residency import ModelResidency, check_budget
from muxserve.models.loader import validate_checkpoint
from muxserve.output_processor import Completion, OutputSink, RequestOutput, TextState
from muxserve.request import FinishReason, Request
from muxserve.residency import ModelState, WakeStats
from muxserve.runner.kv_pool import KVPool, PoolSizing
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, JobResult, Phase, SeqWork
from muxserve.scheduler.scheduler import ModelStats, Scheduler, SchedulerSnapshot
from muxserve.served_model import ServedModel
from muxserve.step_controls import RequestControls, StepControls
from muxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)
EXPIRY_CHECK_S = 0.25  # how often requests are checked against engine.request_timeout_s

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
        check_budget(specs, eng.residency.weights_budget_bytes)
        # The executor loads the weights, then allocates the pool in what they leave (worker
        # processes map it: shared memory, CUDA IPC); the scheduler accounts its blocks.
        deadline = JobDeadline(eng.job_timeout_s, eng.job_timeout_per_token_s, eng.job_stall_s)
        lifecycle = WorkerLifecycle(
            eng.worker_start == "lazy", eng.worker_idle_stop_s, eng.worker_pool == "shared"
        )
        self.executor = create_executor(
            eng.executor, specs, PoolSizing.of(eng), self.device, progress, deadline, lifecycle
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
        self._next_expiry_check = 0.0  # time.monotonic() of the next request timeout check
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
        self.residency = ModelResidency(self, asleep)  # sleep, wake, and which stay awake

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
        text = TextState(req, served.tokenizer, sink, controls.constraint if controls else None)
        req.output_check = text
        with self._lock:
            self.residency.admit(model)
            self.scheduler.add_request(req)
            self._controlled += controls is not None
            self._sinks[rid] = sink
            self._texts[rid] = text
            self.residency.on_request(model)
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
        `step()` starts each worker's next job as soon as its last one is done; and while only
        sleeping models have work, for one of them to wake. Returns how many jobs finished
        (0: nothing ran, or nothing finished yet).
        """
        with self._lock:
            self._expire()
            jobs = self.scheduler.schedule()
            running = self.scheduler.jobs_in_flight
            released = self.scheduler.finished_before_round  # the executor may forget these
            controlled = self._prepare(jobs)
            sch = self.scheduler
            if not jobs and not running and sch.has_work() and not sch.has_runnable_work():
                self._wake.wait(POLL_S)  # only sleeping models have work: until one wakes
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

    def _expire(self) -> None:
        """End requests past `engine.request_timeout_s` with a timeout (checked every quarter
        second at most). Under the lock."""
        limit, now = self.config.engine.request_timeout_s, time.monotonic()
        if limit is None or now < self._next_expiry_check:
            return
        self._next_expiry_check = now + EXPIRY_CHECK_S
        for rid in self.scheduler.overdue(limit):
            req = self.scheduler.finish(rid, FinishReason.TIMEOUT)
            if req is not None:
                log.warning("request %s (%s) timed out after %g s", rid, req.model, limit)
                self._emit(req, f"not finished within {limit:g} s (engine.request_timeout_s)")

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
        if req.is_finished and not text.settled:  # ended by an abort, a failed job, a timeout
            text.update(req, req.finish_reason)
        error = error or text.error
        failed = req.finish_reason in (FinishReason.ERROR, FinishReason.TIMEOUT)
        text.emit(req, error if failed else None)
        if req.is_finished:
            del self._texts[req.request_id]  # the sink stays until its reader takes the end
            self._controlled -= req.controls is not None
            self.residency.on_finished()

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        model: str | Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> list[Completion]:
        """Offline: run prompts to completion and return them in order (like vLLM's LLM.generate).

        `model` is one served name for all prompts or one per prompt; default: the first model.
        `timeout_s` bounds the whole call: past it the unfinished requests are aborted and
        `TimeoutError` says how many there were.
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
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        arrived = threading.Event()  # set by any of this call's sinks on each output
        done: dict[str, Completion] = {}
        sinks = {}
        order = []
        for p, m, sp in zip(prompts, models, plist, strict=True):
            req = self._submit(m, p, sp, None)
            rid = req.request_id
            sinks[rid] = self._sinks[rid]
            sinks[rid].watch(arrived)
            done[rid] = Completion(rid, m, list(req.prompt_token_ids))
            order.append(rid)
        pending = set(order)
        while pending:
            if deadline is not None and time.monotonic() >= deadline:
                for rid in pending:
                    self.abort(rid)
                raise TimeoutError(
                    f"generate: {len(pending)} of {n} requests unfinished after {timeout_s} s"
                )
            if self._thread is None:
                if not self.step() and not self.has_work():
                    break
            else:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                arrived.wait(left)
                arrived.clear()
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
        self.residency.start()

    def _loop(self) -> None:
        try:
            while self._running:
                self.executor.stop_idle()  # outside the lock: a stop waits for the workers
                with self._lock:
                    if self._running and not self.scheduler.has_runnable_work():
                        self._wake.wait(timeout=0.5)
                        continue
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
        self.residency.stop()
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

    # ---- sleep and wake (muxserve/model_residency.py) ------------------------------------------
    def sleep(self, model: str, level: int = 1) -> None:
        """Put `model` to sleep (level 1: weights to host memory; 2: dropped); blocks while
        they move. ModelBusyError while it has requests in flight."""
        self.residency.sleep(model, level)

    def wake(self, model: str) -> float:
        """Wake `model`; the seconds its weights took to come back (0.0: awake already).
        ModelDoesNotFitError when no room can be made."""
        return self.residency.wake(model)

    def model_states(self) -> dict[str, ModelState]:
        return self.residency.states()

    # ---- models joining and leaving (muxserve/roster.py) -------------------------------------
    def add_model(self, entry: ModelEntry) -> ServedModel:
        """Serve one more model, asleep until woken (or asked for); see `roster.add_model`."""
        return roster.add_model(self, entry)

    def remove_model(self, model: str) -> None:
        """Stop serving an asleep, drained model; see `roster.remove_model`."""
        roster.remove_model(self, model)

    def wake_stats(self) -> dict[str, WakeStats]:
        return self.residency.wake_stats()

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
