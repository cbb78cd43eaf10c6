"""SM partitions: the split arithmetic, and the driver calls behind it against a fake driver.

The fake stands in for cuda-python's `cuda.bindings.driver`: it splits a device of N SMs into
groups and records every call, so the test sees that the device is split once and that each
green context is made from its own groups of that one split (PyTorch issue 195378: torch's
per-call `GreenContext.create` gives every context the same first SMs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from muxserve.runner import sm_partition as smp
from muxserve.runner.sm_partition import (
    assign_groups,
    make_partitions,
    may_run_together,
    overlap_sms,
    share_groups,
    split_unit,
)

H200_SMS = 132  # an H200 (and an H100 SXM): 16 groups of 8, 4 SMs left over


# ---- arithmetic ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("share", "total", "group", "groups", "want"),
    [
        (0.5, H200_SMS, 8, 16, 8),  # 66 SMs -> 64: rounded down, never up to 72
        (0.25, H200_SMS, 8, 16, 4),
        (0.3, 80, 8, 10, 3),  # 24 SMs exactly (0.3 * 80 / 8 is 2.9999999999999996)
        (0.01, H200_SMS, 8, 16, 1),  # at least one group
        (0.99, H200_SMS, 8, 16, 16),  # at most all of them
        (0.3, 108, 2, 54, 16),  # an A100: groups of 2, 32.4 SMs -> 32
    ],
)
def test_share_groups_round_down(share, total, group, groups, want):
    assert share_groups(share, total, group, groups) == want


@pytest.mark.parametrize(("major", "unit"), [(7, 2), (8, 2), (9, 8), (10, 8)])
def test_split_unit(major, unit):
    assert split_unit(major) == unit


def test_may_run_together():
    assert may_run_together(0.6, 0.4)
    assert may_run_together(0.7, 0.1 + 0.2)  # 1.0000000000000002 after rounding: still 1
    assert not may_run_together(0.6, 0.6)


def test_two_halves_of_an_h200_are_disjoint():
    layout = assign_groups({"a": 0.5, "b": 0.5}, 16, 8, H200_SMS)
    assert layout == {"a": tuple(range(8)), "b": tuple(range(8, 16))}
    assert overlap_sms(layout, 8) == 0


def test_shares_that_fit_are_disjoint_in_share_order():
    shares = {"a": 0.2, "b": 0.3, "c": 0.25}  # 3 + 4 + 4 groups of 16
    layout = assign_groups(shares, 16, 8, H200_SMS)
    assert layout == {"b": (0, 1, 2, 3), "c": (4, 5, 6, 7), "a": (8, 9, 10)}
    assert overlap_sms(layout, 8) == 0


def test_oversubscribed_shares_stack_what_never_runs_together():
    # two models, prefill 0.6 and decode 0.4 each: 9 + 9 + 6 + 6 groups of 16
    shares = {("a", "p"): 0.6, ("a", "d"): 0.4, ("b", "p"): 0.6, ("b", "d"): 0.4}
    layout = assign_groups(shares, 16, 8, H200_SMS)
    assert layout == {
        ("a", "p"): tuple(range(9)),
        ("b", "p"): tuple(range(9)),  # 0.6 + 0.6 never run at once: the same groups
        ("a", "d"): (9, 10, 11, 12, 13, 14),  # apart from both prefills
        ("b", "d"): (9, 10, 11, 12, 13, 15),  # apart from both prefills, 5 groups with a's
    }
    assert overlap_sms(layout, 8) == (9 + 5) * 8


def test_equal_shares_per_phase_pair_prefills_and_decodes():
    shares = {("a", "p"): 0.5, ("a", "d"): 0.5, ("b", "p"): 0.5, ("b", "d"): 0.5}
    layout = assign_groups(shares, 16, 8, H200_SMS)
    assert layout == {
        ("a", "p"): tuple(range(8)),
        ("a", "d"): tuple(range(8, 16)),
        ("b", "p"): tuple(range(8)),
        ("b", "d"): tuple(range(8, 16)),
    }


# ---- the driver calls, against a fake cuda.bindings.driver ----------------------------------
@dataclass
class FakeSm:
    smCount: int  # the driver's field names
    minSmPartitionSize: int = 0
    smCoscheduledAlignment: int = 0


@dataclass
class FakeResource:
    sm: FakeSm
    group: int | None = None  # index in its split; None: the whole device


class FakeDriver:
    """Records calls; splits `total` SMs into groups of the requested size."""

    def __init__(
        self, total: int, unit_reported: int = 0, fail: str | None = None, fail_on: int = 1
    ) -> None:
        self.total = total
        self.unit_reported = unit_reported
        self.fail = fail  # the call that fails ...
        self.fail_on = fail_on  # ... the fail_on-th time it is made
        self.calls: list[tuple[Any, ...]] = []
        self.live: set[str] = set()
        self.CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM="SM")
        self.CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM="DEFAULT")
        self.CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING="NON_BLOCKING")

    def _failing(self, name: str) -> bool:
        made = sum(1 for c in self.calls if c[0] == name)
        return self.fail == name and made == self.fail_on

    def _ok(self, name: str, *out: Any) -> tuple[Any, ...]:
        return (801,) if self._failing(name) else (0, *out)

    def cuDeviceGet(self, index):
        self.calls.append(("cuDeviceGet", index))
        return self._ok("cuDeviceGet", f"dev{index}")

    def cuDeviceGetDevResource(self, dev, kind):
        self.calls.append(("cuDeviceGetDevResource", dev, kind))
        u = self.unit_reported
        return self._ok("cuDeviceGetDevResource", FakeResource(FakeSm(self.total, u, u)))

    def cuDevSmResourceSplitByCount(self, groups, resource, flags, minimum):
        self.calls.append(("split", groups, resource.group, flags, minimum))
        res = [FakeResource(FakeSm(minimum), i) for i in range(groups)]
        rest = FakeResource(FakeSm(self.total - groups * minimum))
        return self._ok("split", res, groups, rest)

    def cuDevResourceGenerateDesc(self, resources, count):
        ids = tuple(r.group for r in resources)
        self.calls.append(("desc", ids, count))
        return self._ok("desc", ("desc", ids))

    def cuGreenCtxCreate(self, desc, dev, flags):
        name = f"green{desc[1]}"
        self.calls.append(("green", desc[1], dev, flags))
        if self._failing("green"):
            return (801,)
        self.live.add(name)
        return (0, name)

    def cuGreenCtxStreamCreate(self, green, flags, priority):
        self.calls.append(("stream", green, flags, priority))
        if self._failing("stream"):
            return (801,)
        handle = 1000 + len(self.live)
        self.live.add(f"stream{handle}")
        return (0, handle)

    def cuStreamDestroy(self, raw):
        self.live.discard(f"stream{raw}")
        return (0,)

    def cuGreenCtxDestroy(self, green):
        self.live.discard(green)
        return (0,)


@dataclass
class FakeStream:
    cuda_stream: int


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.cuda's calls the partitions make, on CPU: streams are numbered handles."""
    plain: list[str] = []

    def stream(device: torch.device) -> FakeStream:
        plain.append(str(device))
        return FakeStream(len(plain))

    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_stream_from_external", lambda raw, device: FakeStream(raw))
    return plain


CUDA0 = torch.device("cuda", 0)


def test_one_split_for_all_partitions(monkeypatch, fake_cuda):
    drv = FakeDriver(H200_SMS)
    monkeypatch.setattr(smp, "_driver", lambda: drv)
    shares = {"a": 0.5, "b": 0.25, "full": 1.0}
    parts = make_partitions(CUDA0, shares)
    assert [c for c in drv.calls if c[0] == "split"] == [("split", 16, None, 0, 8)]
    assert [c[1] for c in drv.calls if c[0] == "desc"] == [tuple(range(8)), (8, 9, 10, 11)]
    assert [c[1:] for c in drv.calls if c[0] == "stream"] == [
        ("green(0, 1, 2, 3, 4, 5, 6, 7)", "NON_BLOCKING", 0),
        ("green(8, 9, 10, 11)", "NON_BLOCKING", 0),
    ]
    assert {k: p.num_sms for k, p in parts.items()} == {"a": 64, "b": 32, "full": None}
    assert fake_cuda == ["cuda:0"]  # the share of 1: a plain stream
    a, b = parts["a"].stream.cuda_stream, parts["b"].stream.cuda_stream
    assert (smp.stream_sms(a), smp.stream_sms(b), smp.stream_sms(1)) == (64, 32, None)
    for p in parts.values():
        p.close()
        p.close()  # idempotent
    assert drv.live == set()
    assert smp.stream_sms(a) is None


def test_the_driver_reports_its_split_unit(monkeypatch, fake_cuda):
    drv = FakeDriver(108, unit_reported=4)  # an A100 whose driver asks for groups of 4
    monkeypatch.setattr(smp, "_driver", lambda: drv)
    parts = make_partitions(CUDA0, {"a": 0.5})
    assert [c for c in drv.calls if c[0] == "split"] == [("split", 27, None, 0, 4)]
    assert parts["a"].num_sms == 52  # 54 SMs -> 13 groups of 4


def test_a_refusing_driver_gives_plain_streams_and_says_so(monkeypatch, fake_cuda, caplog):
    drv = FakeDriver(H200_SMS, fail="green", fail_on=2)  # after the first context is made
    monkeypatch.setattr(smp, "_driver", lambda: drv)
    with caplog.at_level(logging.WARNING, smp.log.name):
        parts = make_partitions(CUDA0, {"a": 0.5, "b": 0.5})
    assert {k: p.num_sms for k, p in parts.items()} == {"a": None, "b": None}
    assert [r.getMessage() for r in caplog.records] == [
        "green contexts failed (CUDA driver error 801 (801)): SM shares are not enforced"
    ]
    assert [c[0] for c in drv.calls].count("green") == 2
    assert drv.live == set()  # the first context, made before the failure, was destroyed


def test_without_cuda_bindings_several_shares_run_on_plain_streams(monkeypatch, fake_cuda, caplog):
    monkeypatch.setattr(smp, "_driver", lambda: None)
    with caplog.at_level(logging.WARNING, smp.log.name):
        parts = make_partitions(CUDA0, {"a": 0.5, "b": 0.3})
    assert {k: p.num_sms for k, p in parts.items()} == {"a": None, "b": None}
    assert [r.getMessage() for r in caplog.records] == [
        "cuda-bindings is not installed (pip install cuda-bindings): 2 SM shares below 1 run on "
        "plain streams, not enforced"
    ]


def test_all_full_shares_touch_no_driver(monkeypatch, fake_cuda):
    monkeypatch.setattr(smp, "_driver", lambda: pytest.fail("no split for shares of 1"))
    parts = make_partitions(CUDA0, {"a": 1.0, "b": 1.0})
    assert {k: p.num_sms for k, p in parts.items()} == {"a": None, "b": None}


def test_a_failed_stream_destroys_its_context(monkeypatch, fake_cuda):
    drv = FakeDriver(H200_SMS, fail="stream", fail_on=1)
    monkeypatch.setattr(smp, "_driver", lambda: drv)
    parts = make_partitions(CUDA0, {"a": 0.5})
    assert parts["a"].num_sms is None
    assert drv.live == set()
