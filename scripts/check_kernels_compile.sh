#!/usr/bin/env bash
# Compiles every csrc/*.cu with nvcc for sm_80 and sm_90 (no GPU needed): the CI check that
# the kernels build. Usage: scripts/check_kernels_compile.sh [arch ...]   (default: 80 90)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_kernels_compile: nvcc not found on PATH" >&2
  exit 1
fi
shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_kernels_compile: no csrc/*.cu to compile" >&2
  exit 1
fi
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
jobs_max=$(nproc 2>/dev/null || echo 2)
start=$SECONDS
echo "nvcc: $(nvcc --version | tail -1)"

# one background job per (source, arch); each writes its log, and its status as a file
for src in "${sources[@]}"; do
  for arch in "${archs[@]}"; do
    name="$(basename "$src" .cu)-sm$arch"
    (
      if nvcc -c -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -Wall \
        -gencode "arch=compute_$arch,code=sm_$arch" -I csrc "$src" -o "$out/$name.o" \
        >"$out/$name.log" 2>&1; then
        echo ok >"$out/$name.status"
      else
        echo failed >"$out/$name.status"
      fi
    ) &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 0.2; done
  done
done
wait

failed=0
for status in "$out"/*.status; do
  name="$(basename "$status" .status)"
  if [ "$(cat "$status")" = ok ]; then
    echo "  ok      $name"
  else
    failed=1
    echo "  FAILED  $name" >&2
    cat "$out/$name.log" >&2
  fi
done
if [ "$failed" -ne 0 ]; then
  echo "check_kernels_compile: FAILED" >&2
  exit 1
fi
echo "check_kernels_compile: ${#sources[@]} file(s) x ${#archs[@]} arch(s) compiled in $((SECONDS - start)) s"
