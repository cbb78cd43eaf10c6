"""Where one model's weights are: on its device, in host memory (asleep, level 1), or gone.

A sleeping model at level 1 keeps every parameter and buffer in host memory (pinned on a GPU,
so the copy back is a fast DMA); its module keeps its structure, so waking is a copy, and the
tensors come back bit for bit. On a CPU the device is the host: sleeping moves nothing.
"""

from __future__ import annotations

import torch

from muxserve.models.causal_lm import CausalLM
from muxserve.models.stacked import bind_stacks

HOST = torch.device("cpu")


def weight_bytes(model: CausalLM) -> int:
    """Bytes of the model's parameters and buffers (a tied tensor once)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class ModelWeights:
    """Moves one model's tensors between its device and host memory.

    `model` None: not loaded (asleep at level 2 from the start); `nbytes` is then the
    checkpoint's estimate until it is loaded.
    """

    def __init__(self, model: CausalLM | None, nbytes: int = 0) -> None:
        self.nbytes = weight_bytes(model) if model is not None else nbytes
        self.on_device = model is not None
        self.in_host = False  # a level-1 copy is held in host memory

    def to_host(self, model: CausalLM, max_len: int | None) -> None:
        """Every tensor to host memory (pinned where CUDA is); the device copies are freed."""
        device = next(model.parameters()).device
        if device.type == "cuda":
            model._apply(_pinned_copy)
            model.build_rope_cache(HOST, max_len)  # its tables are not buffers
            # defensive: on CUDA the weights are not laid out as stacks (only the CPU loader's
            # arena is), so none is bound; were one, it would keep the device copies alive
            bind_stacks(model)
            torch.cuda.empty_cache()  # give the freed weights back to the device
        self.on_device, self.in_host = False, True

    def to_device(self, model: CausalLM, device: torch.device, max_len: int | None) -> None:
        """The host copies back onto `device`, on a stream of their own (so the jobs of other
        models, on theirs, do not wait for the copy), synchronised before returning."""
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                model._apply(lambda t: t.to(device, non_blocking=True))
                model.build_rope_cache(device, max_len)
            stream.synchronize()
            bind_stacks(model)
        self.on_device, self.in_host = True, False

    def dropped(self) -> None:
        """The model was let go (level 2): a wake loads its checkpoint again."""
        self.on_device, self.in_host = False, False


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu" and t.is_pinned():  # a tied tensor, moved already
        return t
    host = torch.empty(t.shape, dtype=t.dtype, device=HOST, pin_memory=True)
    host.copy_(t)
    return host
