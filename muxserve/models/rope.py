"""Rotary position embeddings (RoPE) for arbitrary per-token positions.

A batch mixes sequences at different offsets, so cos/sin are looked up per token from a table
(built for the served context, which may be far shorter than `max_position_embeddings`, and
grown on demand). The inverse frequencies of each
`rope_type` follow transformers' `modeling_rope_utils.py` expression by expression, so that the
float32 values, and hence the logits, are the same as HF's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from muxserve.models.hf_config import HFModelConfig


def rope_parameters(
    config: HFModelConfig, device: torch.device, seq_len: int | Tensor | None = None
) -> tuple[Tensor, float]:
    """Inverse frequencies `(rotary_dim // 2,)` in float32 and the cos/sin scale ("attention
    factor").

    `seq_len` matters for "dynamic" (NTK) scaling, which stretches the base for sequences
    longer than `max_position_embeddings`, and for "longrope", whose long factors apply past
    `original_max_position_embeddings`.
    """
    scaling = config.rope_scaling or {"rope_type": "default"}
    rope_type = scaling["rope_type"]
    base, dim = config.rope_theta, config.rotary_dim
    if rope_type == "default":
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0
    if rope_type == "linear":
        return _exponents_inv_freq(base, dim, device) / scaling["factor"], 1.0
    if rope_type == "dynamic":
        return _dynamic_inv_freq(config, scaling, device, seq_len), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(base, dim, scaling, device), 1.0
    if rope_type == "yarn":
        return _yarn_parameters(config, scaling, device)
    if rope_type == "longrope":
        return _longrope_parameters(config, scaling, device, seq_len)
    raise ValueError(f"rope type {rope_type!r} is not implemented")


def _exponents_inv_freq(base: float | Tensor, dim: int, device: torch.device) -> Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float) / dim
    return 1.0 / (base**exponents)


def _dynamic_inv_freq(
    config: HFModelConfig,
    scaling: dict[str, Any],
    device: torch.device,
    seq_len: int | Tensor | None,
) -> Tensor:
    # HF passes a python int at init and a tensor (max position + 1) in the forward; the two take
    # different float paths, so both are mirrored.
    mpe = config.max_position_embeddings
    dim, factor = config.rotary_dim, scaling["factor"]
    length: int | Tensor
    if seq_len is None:
        length = mpe
    elif isinstance(seq_len, Tensor):
        length = torch.maximum(seq_len, torch.tensor(mpe, dtype=seq_len.dtype, device=device))
    else:
        length = max(seq_len, mpe)
    base = config.rope_theta * ((factor * length / mpe) - (factor - 1)) ** (dim / (dim - 2))
    return _exponents_inv_freq(base, dim, device)


def _llama3_inv_freq(
    base: float, dim: int, scaling: dict[str, Any], device: torch.device
) -> Tensor:
    inv_freq = _exponents_inv_freq(base, dim, device)
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are interpolated by `factor`, short ones kept, the middle band blended
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


def _yarn_parameters(
    config: HFModelConfig, scaling: dict[str, Any], device: torch.device
) -> tuple[Tensor, float]:
    base, dim = config.rope_theta, config.rotary_dim
    original_mpe = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_mpe

    def get_mscale(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_mpe / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp(
        (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1
    )
    extrapolation_factor = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def _longrope_parameters(
    config: HFModelConfig,
    scaling: dict[str, Any],
    device: torch.device,
    seq_len: int | Tensor | None,
) -> tuple[Tensor, float]:
    # Phi-3: per-frequency divisors, the short ones within the pretraining length, the long
    # ones past it; the attention factor comes from the context extension ratio
    base, dim = config.rope_theta, config.rotary_dim
    original_mpe = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_mpe
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_mpe))
        )
    long = seq_len is not None and seq_len > original_mpe
    ext = torch.tensor(
        scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device
    )
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext * base**shape), float(attention_factor)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim: the rotation in HF's (non-interleaved) layout."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (T, heads, head_dim) by per-token angles; `cos`, `sin`: (T, rotary_dim), or
    (T, 1, rotary_dim) as the decoder passes them (unsqueezed once per forward, not per call).

    With a partial rotary factor only the first `rotary_dim` dims of each head turn, the rest
    pass through, as in transformers' Phi-3.
    """
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, rd): broadcast over heads
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class RotaryEmbedding(nn.Module):
    """Per-token cos/sin for one model, from a float32 table indexed by position.

    The table and `inv_freq` are plain attributes, not buffers, so `model.to(bfloat16)` cannot
    round them (HF also computes the angles in float32 and casts cos/sin last). Build the table on
    the serving device with `build_cache` before the KV pool is sized; it grows if a position
    beyond it shows up. "dynamic" scaling past `max_position_embeddings` is recomputed for each
    call from its longest position, as HF does, and never cached. "longrope" rotates
    positions within `original_max_position_embeddings` with the short factors and positions
    past it with the long ones: one table, per token. HF picks one set per forward call from
    its longest position, and its `generate` re-prefills a sequence the first time it passes
    the original length so that every cached key turns with the long factors; we recompute
    nothing. The two agree for sequences within the original length (4K tokens for
    Phi-3-mini-128k) and for each step of a decode past it; they differ for tokens before the
    original length in a sequence that runs past it.
    """

    def __init__(self, config: HFModelConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_scaling or {}).get("rope_type", "default")
        self.max_position = config.max_position_embeddings
        cpu = torch.device("cpu")  # explicit: the model may be built under a meta-device context
        self.inv_freq, self.attention_scaling = rope_parameters(config, cpu)
        # longrope: from this position on, the long factors rotate (None: one set throughout)
        self.long_from: int | None = None
        self.long_inv_freq: Tensor | None = None
        if self.rope_type == "longrope":
            scaling = config.rope_scaling or {}
            self.long_from = int(scaling["original_max_position_embeddings"])
            self.long_inv_freq, _ = rope_parameters(config, cpu, self.long_from + 1)
        # (cos, sin), each (L, hd // 2) float32 times attention_scaling; one attribute, swapped
        # whole, so a job on another thread never sees a cos and a sin of different lengths
        self._table: tuple[Tensor, Tensor] | None = None

    def build_cache(self, device: torch.device, length: int | None = None) -> None:
        """(Re)build the cos/sin table on `device` for positions `[0, length)`: the served
        context (default `max_position_embeddings`). A config may claim 10^8 positions; the
        table holds what is served."""
        self._build(device, self.max_position if length is None else length)

    @property
    def table_positions(self) -> int:
        """How many positions the cos/sin table holds now (0 before it is built)."""
        table = self._table
        return 0 if table is None else table[0].shape[0]

    def _build(self, device: torch.device, length: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(length, device=device)
        table = self._half_tables(positions, self.inv_freq.to(device))
        self._table = table
        return table

    def _half_tables(self, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, rd/2)
        if self.long_inv_freq is not None and self.long_from is not None:
            long = positions.to(torch.float32)[:, None] * self.long_inv_freq.to(inv_freq.device)
            freqs = torch.where(positions[:, None] >= self.long_from, long, freqs)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for each token: `positions` (T,) int64 -> two (T, rotary_dim) in `dtype`."""
        # one host sync per forward: the table must cover the largest position
        longest = int(positions.max()) + 1 if positions.numel() else 0
        if self.rope_type == "dynamic" and longest > self.max_position:
            seq_len = positions.max() + 1  # a tensor, as in HF's forward
            inv_freq, _ = rope_parameters(self.config, positions.device, seq_len)
            cos, sin = self._half_tables(positions, inv_freq)
        else:
            table = self._table
            cached = 0 if table is None else table[0].shape[0]
            if table is None or cached < longest:
                table = self._build(positions.device, max(longest, 2 * cached))
            elif table[0].device != positions.device:
                table = self._build(positions.device, cached)
            cos, sin = table[0][positions], table[1][positions]  # (T, rd/2)
        cos = torch.cat((cos, cos), dim=-1)  # (T, rd)
        sin = torch.cat((sin, sin), dim=-1)
        if cos.dtype == dtype:
            return cos, sin
        return cos.to(dtype), sin.to(dtype)
