"""Benchmarks: workload traces, the load client, metrics and plots (`muxserve bench`).

One implementation: `muxserve bench`, `scripts/gen_workload.py` and `scripts/bench_modes.py`
all use these modules. Nothing here imports torch or the engine: the client only speaks the
OpenAI HTTP protocol, so it measures our server or any compatible endpoint alike.
"""
