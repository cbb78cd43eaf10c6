#!/usr/bin/env bash
# Issue 16, Part B: the GPU checks, in stages that each fit one device call (10 minutes).
#
#   OUT=/some/dir bash scripts/gpu_check.sh STAGE [STAGE ...]     (default OUT: ./gpu-results)
#
# Stages, in the order to run them (about 13 minutes in all on an H100/H200, checkpoints
# written on the way; run `env` + `probe` first, they are short and decide whether the rest
# means anything):
#   env         what the machine has: GPU, driver, nvcc, torch, cuda-bindings, MPS control
#   probe       which SMs each green context's kernels run on (disjoint?), torch's overlap
#   kernels     kernels vs reference, graphs vs eager (lazy and on a partition stream), the
#               launch probe, SDPA backend under GQA, decode bandwidth, Llama-7B step vs floor
#   mps         MPS: IPC parity with inline, daemon cleanup, 30% vs 100% decode share
#   colocation  two Llama-7B-architecture models co-located vs alone vs one job at a time
#   profile     scripts/profile_models.py for LLaMA-7B at SM 0.5 and 1.0 (tp 1)
#
# Everything each stage measures is appended to $OUT/gpu-report.jsonl (one JSON object per
# measurement, with the GPU's name); each stage's output goes to $OUT/<stage>.log and its
# pytest result to $OUT/<stage>.xml. Model checkpoints go to $MUXSERVE_CACHE (default
# /tmp/muxserve-cache), not to $OUT: they are 4-14 GB.
#
# cuda-bindings (issue 16.1's green-context split) is needed for `probe` and the partition
# tests; the device machine has no network, so download a wheel here first and carry it:
#   pip download --no-deps --only-binary=:all: -d .gpu-wheels 'cuda-bindings==12.9.*'
# (the major version of the driver's CUDA); the `env` stage installs it from .gpu-wheels/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export MUXSERVE_GPU_REPORT="$OUT/gpu-report.jsonl"
export MUXSERVE_CACHE=${MUXSERVE_CACHE:-/tmp/muxserve-cache}
PYTEST=(python -m pytest -p no:cacheprovider -m gpu -s -q -rA)

run_stage() {
  local stage=$1 seconds=$2
  shift 2
  echo "== $stage ($(date -u +%H:%M:%S), limit ${seconds}s): $*"
  timeout "$seconds" "$@" >"$OUT/$stage.log" 2>&1
  local rc=$?
  echo "== $stage: exit $rc" | tee -a "$OUT/$stage.log"
  tail -n 15 "$OUT/$stage.log"
  return 0  # later stages run anyway: each is independent
}

stage_env() {
  {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv
    command -v nvcc && nvcc --version
    command -v nvidia-cuda-mps-control || echo "no nvidia-cuda-mps-control"
    if [ -d .gpu-wheels ]; then
      python -m pip install --no-index --find-links .gpu-wheels cuda-bindings
    fi
    python - <<'EOF'
import torch
from muxserve.runner.kernels.kernel_build import toolchain
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
print("toolchain (nvcc, driver, torch):", toolchain())
try:
    from cuda.bindings import driver
    print("cuda-bindings", getattr(driver, "__version__", "present"))
except ImportError as e:
    print("cuda-bindings missing:", e)
from torch.cuda import green_contexts
print("torch green contexts:", green_contexts.SUPPORTED)
EOF
  } >"$OUT/env.log" 2>&1
  cat "$OUT/env.log"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env probe kernels mps colocation profile)
for stage in "${stages[@]}"; do
  case $stage in
    env) stage_env ;;
    probe)
      run_stage probe 240 "${PYTEST[@]}" tests/gpu/test_partitions.py -k sm_probe \
        --junitxml="$OUT/probe.xml" ;;
    kernels)
      run_stage kernels 540 "${PYTEST[@]}" tests/gpu/test_kernels.py \
        tests/gpu/test_partitions.py tests/gpu/test_performance.py -k "not sm_probe" \
        --junitxml="$OUT/kernels.xml" ;;
    mps)
      run_stage mps 540 "${PYTEST[@]}" tests/gpu/test_mps.py --junitxml="$OUT/mps.xml" ;;
    colocation)
      run_stage colocation 570 "${PYTEST[@]}" tests/gpu/test_colocation.py \
        --junitxml="$OUT/colocation.xml" ;;
    profile)
      gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
      run_stage profile 540 env MUXSERVE_KERNELS=on MUXSERVE_CUDA_GRAPHS=1 \
        python scripts/profile_models.py --model configs/models/llama-7b --sm 0.5 1.0 \
        --out "$OUT/profile-$gpu.json" ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
done
