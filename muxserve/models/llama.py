"""The Llama family (Llama, Mistral, Qwen2) is the generic decoder: `muxserve.models.decoder`.

These names stay importable for code written before the registry; new code asks the registry
(`muxserve.models.registry`) for an architecture's class.
"""

from __future__ import annotations

from muxserve.models.causal_lm import Attention
from muxserve.models.decoder import DecoderForCausalLM as LlamaForCausalLM
from muxserve.models.decoder import parameter_shapes

__all__ = ["Attention", "LlamaForCausalLM", "parameter_shapes"]
