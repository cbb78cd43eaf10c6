"""CUDA kernels over the unified pool (`csrc/`): their build (`kernel_build`) and the dispatch
that runs them on a GPU, or the torch reference in `runner.attention` elsewhere (`ops`)."""
