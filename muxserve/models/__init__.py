"""Model families behind one `CausalLM` protocol, found by architecture name in the registry;
config parsing, layers, RoPE variants, weight loading (safetensors, .bin, Hub cache), and the
slicing of a loaded model into tensor-parallel shards.

`hf_config`, `family_config` and `registry` are torch-free (the planner reads them); the rest
needs torch.
"""
