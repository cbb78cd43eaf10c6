"""Dense causal attention over packed sequences, without a KV cache: the reference `Attention`.

Each sequence attends only to its own tokens in this call (a whole-prompt prefill), computed the
way transformers' eager attention does it, so a model run with it reproduces HF's logits. Tests
and the runner's no-cache checks use it; it is O(n^2) per sequence and not meant for serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class DenseAttention:
    """Implements `muxserve.models.causal_lm.Attention` for sequences packed back to back in T.

    `seq_lens` gives the token count of each sequence in the order they are packed;
    `sliding_windows[layer]` is that layer's window (None: full causal), normally
    `config.layer_sliding_windows`; `softcap` is `config.attn_logit_softcap`. Positions inside a
    sequence are taken to be consecutive.
    """

    def __init__(
        self,
        seq_lens: Sequence[int],
        sliding_windows: Sequence[int | None],
        softcap: float | None = None,
    ) -> None:
        if any(n <= 0 for n in seq_lens):
            raise ValueError(f"sequence lengths must be positive, got {list(seq_lens)}")
        self.seq_lens = list(seq_lens)
        self.sliding_windows = list(sliding_windows)
        self.softcap = softcap

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        total = sum(self.seq_lens)
        if q.shape[0] != total:
            raise ValueError(f"got {q.shape[0]} tokens, the sequence lengths sum to {total}")
        window = self.sliding_windows[layer]
        outs = [
            _causal_attention(qs, ks, vs, window, self.softcap)
            for qs, ks, vs in zip(
                q.split(self.seq_lens), k.split(self.seq_lens), v.split(self.seq_lens), strict=True
            )
        ]
        return torch.cat(outs)  # (T, nh, hd)


def _causal_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, softcap: float | None = None
) -> Tensor:
    """One sequence: q (n, nh, hd), k/v (n, nkv, hd) -> (n, nh, hd), as HF's eager attention."""
    n, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (n, nh, hd): query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=1)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (nh, n, hd)
    scores = torch.matmul(qh, kh.transpose(1, 2)) * head_dim**-0.5  # (nh, n, n)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(n, device=q.device)
    distance = i[:, None] - i[None, :]  # query index - key index
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vh).transpose(0, 1)  # (n, nh, hd)
