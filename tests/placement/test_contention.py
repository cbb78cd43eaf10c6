"""The contention clock: finishing times of jobs that run at once, worked out by hand."""

from __future__ import annotations

import pytest

from placement.contention import CONTENTION_MODES, JobDemand, RunningJobs

MS = 1e-3


def decode(alone_ms: float, hbm: float, sm: float = 0.5) -> JobDemand:
    """A memory-bound job (a decode step)."""
    return JobDemand(alone_ms * MS, sm, hbm, compute_bound=False)


def prefill(alone_ms: float, sm: float, hbm: float = 0.05, curve: float | None = None) -> JobDemand:
    """A compute-bound job; `curve`: its pace on a share s is (s / sm) ** curve (MPS-like)."""
    at = None
    if curve is not None:

        def at(s: float) -> float:
            return alone_ms * MS * (sm / s) ** curve

    return JobDemand(alone_ms * MS, sm, hbm, compute_bound=True, at_share=at)


def run(mode: str, starts: list[tuple[float, str, JobDemand]]) -> list[tuple[str, float]]:
    """Start each job at its time (ms), in order; return (job, end in ms) in finishing order."""
    jobs: RunningJobs[str] = RunningJobs(mode)  # type: ignore[arg-type]
    out = []
    pending = sorted(starts, key=lambda s: s[0])
    while pending or len(jobs):
        end = jobs.next_end()
        if pending and (end is None or pending[0][0] * MS < end):
            at, name, demand = pending.pop(0)
            jobs.start(at * MS, name, demand)
            continue
        t, name = jobs.pop()
        out.append((name, t / MS))
    return out


def ends(result: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(n, round(t, 9)) for n, t in result]


def test_modes() -> None:
    assert CONTENTION_MODES == ("none", "start", "shared", "peak")


@pytest.mark.parametrize("mode", CONTENTION_MODES)
def test_a_job_alone_takes_its_latency(mode: str) -> None:
    assert ends(run(mode, [(0, "a", decode(10, 0.9))])) == [("a", 10.0)]
    assert ends(run(mode, [(0, "p", prefill(30, 1.0, curve=0.83))])) == [("p", 30.0)]


def test_two_decodes_over_the_bandwidth_share_it() -> None:
    # a (10 ms, draws 0.8 of HBM) and b (20 ms, 0.6) together ask 1.4: each goes 1/1.4 as fast.
    # a ends at 14 ms; b has then done 10 ms of its 20 and runs the rest alone: 24 ms.
    jobs = [(0, "a", decode(10, 0.8)), (0, "b", decode(20, 0.6))]
    assert ends(run("shared", jobs)) == [("a", 14.0), ("b", 24.0)]
    assert ends(run("none", jobs)) == [("a", 10.0), ("b", 20.0)]
    # the old model slows b by 1.4 for all of it (a started alone, so it is not slowed)
    assert ends(run("start", jobs)) == [("a", 10.0), ("b", 28.0)]


def test_decodes_within_the_bandwidth_do_not_slow() -> None:
    jobs = [(0, "a", decode(10, 0.5)), (0, "b", decode(20, 0.5))]
    assert ends(run("shared", jobs)) == [("a", 10.0), ("b", 20.0)]


def test_a_prefill_takes_its_bandwidth_first() -> None:
    # prefill 0.6 of the SMs, draws 0.1 of HBM; decode 0.4 of the SMs, draws all of HBM.
    # Bandwidth asked: 1.1. The compute-bound prefill keeps its pace; the decode gets the
    # 0.9 left: 10 / 0.9 ms. Two memory-bound jobs with the same draws both slow by 1.1.
    mixed = [(0, "p", prefill(30, 0.6, hbm=0.1)), (0, "d", decode(10, 1.0, sm=0.4))]
    assert ends(run("shared", mixed)) == [("d", round(10 / 0.9, 9)), ("p", 30.0)]
    both = [(0, "p", decode(30, 0.1, sm=0.6)), (0, "d", decode(10, 1.0, sm=0.4))]
    d_end = 11.0  # 10 ms at 1/1.1; p has done 10 of its 30 ms by then, the rest alone
    assert ends(run("shared", both)) == [("d", d_end), ("p", 30.0 + (d_end - 10.0))]


def test_prefills_that_saturate_hbm_all_slow() -> None:
    jobs = [(0, "p", prefill(10, 0.5, hbm=0.7)), (0, "q", prefill(10, 0.5, hbm=0.7))]
    assert ends(run("shared", jobs)) == [("p", 14.0), ("q", 14.0)]


def test_oversubscribed_sms_are_shared_by_shares() -> None:
    # p starts alone (10 ms at 0.6 of the SMs); q (the same) starts at 5 ms: 1.2 of the SMs
    # asked, so each runs on 0.5 and, in proportion, at 5/6 of its pace. p's last 5 ms take
    # 6 ms (ends at 11); q has then done 5 ms and runs its other 5 alone (ends at 16).
    jobs = [(0, "p", prefill(10, 0.6)), (5, "q", prefill(10, 0.6))]
    assert ends(run("shared", jobs)) == [("p", 11.0), ("q", 16.0)]
    assert ends(run("start", jobs)) == [("p", 10.0), ("q", 17.0)]
    # on an MPS-like curve (pace ∝ share ** 0.83) the SMs they lose cost less
    curved = [(0, "p", prefill(10, 0.6, curve=0.83)), (5, "q", prefill(10, 0.6, curve=0.83))]
    pace = (0.5 / 0.6) ** 0.83
    p_end = 5 + 5 / pace
    assert ends(run("shared", curved)) == [
        ("p", round(p_end, 9)),
        ("q", round(p_end + (10 - (p_end - 5) * pace), 9)),
    ]


def test_peak_counts_the_memory_phases_only() -> None:
    # each decode draws half of HBM over its 10 ms, but moves its bytes in 5 of them (the rest
    # is launch overhead): at peak each asks all of it. shared: 1.0 together, no slow-down;
    # peak: 2.0, each at half pace, both end at 20 ms.
    def half(name: str) -> tuple[float, str, JobDemand]:
        return (0, name, JobDemand(10 * MS, 0.5, 0.5, compute_bound=False, busy_s=5 * MS))

    assert JobDemand(10 * MS, 0.5, 0.5, compute_bound=False, busy_s=5 * MS).peak_hbm() == 1.0
    assert ends(run("shared", [half("a"), half("b")])) == [("a", 10.0), ("b", 10.0)]
    assert ends(run("peak", [half("a"), half("b")])) == [("a", 20.0), ("b", 20.0)]


def test_ties_end_in_start_order_and_paces_are_reported() -> None:
    jobs: RunningJobs[str] = RunningJobs("shared")
    jobs.start(0.0, "a", decode(10, 0.8))
    jobs.start(0.0, "b", decode(10, 0.6))
    assert [(n, round(p, 12)) for n, p in jobs.paces()] == [("a", round(1 / 1.4, 12)),
                                                            ("b", round(1 / 1.4, 12))]  # fmt: skip
    assert jobs.pop()[1] == "a" and jobs.pop()[1] == "b"
    assert jobs.contended


def test_contended_only_when_a_job_was_slowed() -> None:
    for mode in CONTENTION_MODES:
        jobs: RunningJobs[str] = RunningJobs(mode)  # type: ignore[arg-type]
        jobs.start(0.0, "a", decode(10, 0.5))
        jobs.start(0.0, "b", decode(10, 0.5))
        jobs.pop(), jobs.pop()
        assert not jobs.contended, mode
    jobs = RunningJobs("none")
    jobs.start(0.0, "a", decode(10, 0.8))
    jobs.start(0.0, "b", decode(10, 0.8))
    assert not jobs.contended


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"contention must be one of .* got 'fair'"):
        RunningJobs("fair")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive and finite, got 0"):
        JobDemand(0.0, 0.5, 0.1, compute_bound=True)
    with pytest.raises(ValueError, match=r"sm 0\.0, hbm 0\.1"):
        JobDemand(1.0, 0.0, 0.1, compute_bound=True)
    with pytest.raises(IndexError, match="no job is running"):
        RunningJobs("shared").pop()
