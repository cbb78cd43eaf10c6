"""One mesh's replay: the real scheduler over the planned pool, on a clock that charges contention.

The mesh runs its own `muxserve.scheduler.Scheduler` (the plan's engine settings) over a KV
pool of the planned size; each job it schedules takes the cost model's latency at its SM
share, slowed by the jobs running beside it as the contention mode says
(`placement.contention`), and dummy tokens are fed back. `placement.simulator` splits the
workload over the meshes and adds up the results.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from muxserve.config import EngineConfig, SMShare
from muxserve.errors import RequestError
from muxserve.model_descriptor import ModelDescriptor, describe_model
from muxserve.request import Request
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult
from muxserve.scheduler.scheduler import Scheduler
from placement.contention import Contention, JobDemand, RunningJobs
from placement.cost_model import CostModel
from placement.plan import PlacedMesh, PlacedModel, mesh_pool_bytes
from placement.problem import Problem
from placement.specs import PlannerModel


@dataclass
class Track:
    """Timestamps of one request."""

    model: str
    arrival: float
    in_window: bool  # arrived within its mesh's measured window
    first_token: float | None = None
    finish: float | None = None
    rejected: bool = False


@dataclass
class MeshRun:
    """What one mesh's replay gives: each request's timestamps and each model's tokens in the
    measured window; `contended`: some job ran slower than alone (without contention the
    replay would differ)."""

    tracks: list[Track] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    contended: bool = False


def planned_latency(problem: Problem, m: PlacedModel) -> float:
    """A request's planned latency: its prefill, then its decode steps at the planned pace."""
    return m.ttft + problem.targets[problem.index(m.name)].decode_steps * m.tpot


def replay_mesh(
    mesh: PlacedMesh,
    problem: Problem,
    window: tuple[float, float],
    block_bytes: int,
    arrivals: list[tuple[float, str, bool]],
    drain: float,
    contention: Contention,
) -> MeshRun:
    """Replay `arrivals` (time, model, admitted) on one mesh until they are done or late."""
    cost, tp = problem.cost, mesh.size
    engine = problem.engine.model_copy(update={"block_bytes": block_bytes})
    specs = {pm.name: problem.specs[problem.index(pm.name)] for pm in mesh.models}
    models, num_blocks = served_mesh(mesh, problem, block_bytes)
    slots = [replace(d.slot, max_waiting=1 << 30) for d in models]  # queues never refuse
    sched = Scheduler.create(slots, num_blocks, EngineConfig.model_validate(engine.model_dump()))

    out = MeshRun(tokens={pm.name: 0 for pm in mesh.models})
    tracks: dict[str, Track] = {}
    running: RunningJobs[Job] = RunningJobs(contention)
    ids = itertools.count()
    hbm = problem.cluster.gpu.hbm_bytes_per_s * problem.cluster.cost_model.bandwidth_efficiency
    horizon = window[1] + _drain(problem, mesh, window[1], drain)
    now, a = 0.0, 0
    while now < horizon:
        while a < len(arrivals) and arrivals[a][0] <= now:
            at, name, admitted = arrivals[a]
            a += 1
            t = problem.targets[problem.index(name)]
            rid = f"r{next(ids)}"
            tracks[rid] = Track(name, at, window[0] <= at < window[1])
            if not admitted:  # beyond the rate the plan serves: turned away (HTTP 429)
                tracks[rid].rejected = True
                continue
            req = Request(
                rid,
                name,
                [1] * t.prompt_len,
                SamplingParams(max_tokens=t.output_len, ignore_eos=True),
                at,
                0,
            )
            try:
                sched.add_request(req)
            except RequestError:
                tracks[rid].rejected = True
        for job in sched.schedule():
            running.start(now, job, job_demand(cost, specs[job.model], tp, job, hbm))
        next_arrival = arrivals[a][0] if a < len(arrivals) else float("inf")
        next_end = running.next_end()
        if next_end is None and next_arrival == float("inf"):
            break
        if next_end is not None and next_end <= next_arrival:
            now, done = running.pop()
            if done.phase is Phase.DECODE:  # every decoding sequence samples
                outputs = tuple([SeqResult(s.request_id, 0) for s in done.seqs])
                sampled = len(outputs)
            else:
                outputs = tuple([SeqResult(s.request_id, 0 if s.sample else None)
                                 for s in done.seqs])  # fmt: skip
                sampled = sum(s.sample for s in done.seqs)
            if window[0] <= now < window[1]:
                out.tokens[done.model] += sampled
            result = JobResult(done.job_id, outputs)
            for req in sched.on_job_done(done, result):
                tr = tracks[req.request_id]
                if tr.first_token is None and req.output_token_ids:
                    tr.first_token = now
                if req.is_finished:
                    tr.finish = now
        else:
            now = next_arrival
    out.tracks = list(tracks.values())
    out.contended = running.contended
    return out


def job_demand(cost: CostModel, spec: PlannerModel, tp: int, job: Job, hbm: float) -> JobDemand:
    """A job's latency alone at its share, its draw on `hbm` bytes/s, and its SM curve."""
    p = cost.params
    if job.phase is Phase.PREFILL:
        n = len(job.seqs)
        prompt = job.num_tokens / n

        def prefill_at(share: float) -> float:
            return cost.prefill_latency(spec, tp, share, n, prompt)

        lat = prefill_at(job.sm_share)
        moved = cost.prefill_bytes(spec, tp, n, prompt)
        fixed = p.prefill_overhead_s + p.per_seq_overhead_s * n
        return JobDemand(lat, job.sm_share, moved / lat / hbm, True, prefill_at, _busy(lat, fixed))
    batch = len(job.seqs)
    ctx = (sum([s.start_pos for s in job.seqs]) + batch) / batch  # one token each: Σ end_pos

    def decode_at(share: float) -> float:
        return cost.decode_latency(spec, tp, share, batch, ctx)

    lat = decode_at(job.sm_share)
    moved = cost.decode_bytes(spec, tp, batch, ctx)
    fixed = p.step_overhead_s + p.per_seq_overhead_s * batch
    return JobDemand(lat, job.sm_share, moved / lat / hbm, False, decode_at, _busy(lat, fixed))


def _busy(latency: float, fixed: float) -> float:
    """Seconds of a job that move bytes: its latency less its fixed overheads (at least a
    tenth of it: a profiled latency may come below the analytic overheads)."""
    return max(latency - fixed, 0.1 * latency)


def served_mesh(
    mesh: PlacedMesh, problem: Problem, block_bytes: int | None = None
) -> tuple[list[ModelDescriptor], int]:
    """What the engine serving `mesh` derives from the plan: each model's descriptors (dtype,
    one rank's KV layout, shares) and the blocks of its KV pool (`num_blocks` per GPU).

    The same `describe_model` the engine calls, on the facts `to_config` writes for the mesh,
    so the simulated scheduler sees the blocks the served one will.
    """
    block_bytes = block_bytes or problem.engine.block_bytes
    models = []
    for pm in mesh.models:
        spec = problem.specs[problem.index(pm.name)]
        models.append(
            describe_model(
                pm.name,
                spec.config,
                spec.dtype,
                block_bytes=block_bytes,
                tensor_parallel=pm.tensor_parallel,
                sm_share=SMShare(prefill=pm.prefill_share, decode=pm.decode_share),
                rate=pm.serving_rate,
                kv_share=pm.kv_share,
                max_model_len=(spec.max_model_len, problem.engine.max_model_len),
            )
        )
    pool = mesh.kv_pool_bytes
    if pool is None:  # a placement built by hand: size it as `assemble` does
        pool = mesh_pool_bytes(
            problem,
            [(problem.specs[problem.index(m.name)], m.tensor_parallel) for m in mesh.models],
        )
    return models, pool // block_bytes


def _drain(problem: Problem, mesh: PlacedMesh, duration: float, factor: float) -> float:
    """How long to run on after the last arrival: until a request can no longer meet its SLO,
    or has taken `factor` times its planned latency (a request that far behind the plan is
    counted as a miss: this spares simulating the long tail of a generous SLO)."""
    longest = 0.0
    for m in mesh.models:
        t = problem.targets[problem.index(m.name)]
        planned = factor * planned_latency(problem, m)
        if t.ttft is None or t.tpot is None:
            longest = max(longest, min(duration, planned))
            continue
        longest = max(longest, min(1.05 * (t.ttft + t.decode_steps * t.tpot), planned))
    return longest
