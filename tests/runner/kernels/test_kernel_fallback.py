"""What `ops` does around the kernels, on CPU: the launch probe and the fallback it decides,
the SMs a decode launch is sized for, no device reads where the host knows the maxima, and
how prefill calls SDPA under GQA.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from muxserve.runner.attention import BatchLayout, PagedAttention
from muxserve.runner.kernels import kernel_build, ops
from muxserve.runner.kernels.kernel_build import EMULATED, KernelBuildError
from tests.helpers.kernels import decode_batch, make_cache

CPU = torch.device("cpu")


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch):
    """`ops.load_kernels` with its per-process cache emptied before and after."""
    ops.load_kernels.cache_clear()
    yield monkeypatch
    ops.load_kernels.cache_clear()


def fake_kernels(error: str | None = None, write_wrong: bool = False) -> ModuleType:
    """A stand-in for the built binding: launches fail with `error`, or write the wrong row."""
    mod = ModuleType("fake_kernels")

    def write_kv(cache, k, v, tables, seq_of_token, pos_of_token, layer, stream):
        if error is not None:
            raise RuntimeError(error)
        if not write_wrong:
            cache[tables[0, 0, 0, 0], 0, 0] = k[0, 0]
            cache[tables[0, 0, 0, 0], 1, 0] = v[0, 0]

    def decode_attention(out, q, cache, tables, ctx, *rest):
        out[0, 0] = cache[tables[0, 0, 0, 0], 1, 0]

    mod.write_kv = write_kv  # type: ignore[attr-defined]
    mod.decode_attention = decode_attention  # type: ignore[attr-defined]
    return mod


INSUFFICIENT = "CUDA error 35: CUDA driver version is insufficient for CUDA runtime version"


def test_a_build_that_cannot_launch_falls_back_once(fresh_load, caplog):
    fresh_load.setenv(ops.KERNELS_ENV, "auto")
    fresh_load.setattr(ops, "build_kernels", lambda arch: fake_kernels(INSUFFICIENT))
    with caplog.at_level(logging.WARNING, ops.log.name):
        assert ops.load_kernels(EMULATED) is None
        assert ops.load_kernels(EMULATED) is None  # decided once per process
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA kernels unavailable, using the torch reference: the built kernels do not run "
        f"here: {INSUFFICIENT}"
    ]


def test_mode_on_raises_what_the_probe_found(fresh_load):
    fresh_load.setenv(ops.KERNELS_ENV, "on")
    fresh_load.setattr(ops, "build_kernels", lambda arch: fake_kernels(INSUFFICIENT))
    with pytest.raises(
        KernelBuildError, match=r"^the built kernels do not run here: CUDA error 35"
    ):
        ops.load_kernels(EMULATED)


def test_the_probe_checks_where_the_token_went():
    with pytest.raises(KernelBuildError, match=r"^probe: write_kv did not put one token"):
        ops.probe_kernels(fake_kernels(write_wrong=True), CPU)
    ops.probe_kernels(fake_kernels(), CPU)  # a binding that does the right thing passes


@pytest.mark.slow
def test_the_emulated_kernels_pass_the_probe():
    if shutil.which(kernel_build.compiler_for(EMULATED)) is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the torch binding")
    ops.probe_kernels(kernel_build.build_kernels(EMULATED), CPU)


# ---- the SMs a decode launch is sized for ------------------------------------------------
@dataclass
class FakeStream:
    cuda_stream: int


@pytest.mark.parametrize(
    ("stream", "mps", "sms"),
    [
        (7, None, 64),  # a green context's stream: its SMs
        (7, "30", 64),  # (a green context in an MPS client: still its own SMs)
        (8, None, 132),  # a plain stream: the device
        (8, "30", 39),  # an MPS client at 30%: floor(132 * 0.3)
        (8, "0.1", 1),
        (8, "junk", 132),
    ],
)
def test_num_sms_of_the_current_stream(monkeypatch, stream, mps, sms):
    monkeypatch.setattr(ops, "_num_sms", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: FakeStream(stream))
    monkeypatch.setattr(ops, "stream_sms", lambda handle: {7: 64}.get(handle))
    if mps is None:
        monkeypatch.delenv(ops.MPS_PERCENTAGE_ENV, raising=False)
    else:
        monkeypatch.setenv(ops.MPS_PERCENTAGE_ENV, mps)
    assert ops.num_sms(torch.device("cuda", 0)) == sms


def test_a_share_plans_fewer_splits():
    # batch 64, 32 kv heads, 2k context: the whole H200 wants 3 splits, its half (64 SMs) one
    assert ops.split_plan(64, 32, 1, 2048, None, 132) == (3, 704)
    assert ops.split_plan(64, 32, 1, 2048, None, 64) == (1, 2048)


# ---- no reads of a maximum off the device where the host knows it ----------------------
class NoHostRead(torch.Tensor):
    """A tensor whose maximum may not be read (on CUDA, a sync of the job's stream)."""

    def max(self, *args, **kwargs):  # type: ignore[override]
        raise AssertionError("read a maximum off the device")


def test_make_attention_with_host_maxima_reads_nothing_back():
    cache = make_cache(64, 4, 16, torch.float32)
    batch = decode_batch([3, 9, 6], 4, 2, 1, 64, seed=4)
    guarded = BatchLayout(
        seq_of_token=batch.seq_of_token,
        pos_of_token=batch.pos_of_token,
        row_of_token=batch.row_of_token,
        q_lens=batch.q_lens.as_subclass(NoHostRead),
        ctx_lens=batch.ctx_lens.as_subclass(NoHostRead),
        block_tables=batch.block_tables,
    )
    attention = ops.make_attention(cache, guarded, (None, 3), 1, 9)
    assert type(attention) is PagedAttention
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 16, generator=gen) for _ in range(3))
    got = attention(1, q, k, v)
    want_cache = make_cache(64, 4, 16, torch.float32)
    want = PagedAttention(want_cache, batch, (None, 3))(1, q, k, v)
    assert torch.equal(got.as_subclass(torch.Tensor), want)
    assert torch.equal(cache, want_cache)


# ---- prefill SDPA under GQA --------------------------------------------------------------
def test_prefill_sdpa_repeats_kv_heads_instead_of_enable_gqa(monkeypatch):
    calls: list[SimpleNamespace] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append(SimpleNamespace(heads=(q.shape[1], k.shape[1], v.shape[1]), kwargs=kwargs))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", spy)
    cache = make_cache(64, 4, 16, torch.float32)
    batch = decode_batch([5, 11], 4, 1, 2, 64, seed=6)  # 2 kv heads
    ref = PagedAttention(cache, batch, (4,))
    q = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(7))  # 8 query heads
    got = ops._prefill_sdpa(ref, q, 0, 4)
    assert [c.heads for c in calls] == [(8, 8, 8)]
    assert set(calls[0].kwargs) == {"attn_mask"}  # no enable_gqa: a mask with it means math
    want = ref.attend(q, *ref.gather(0), 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
