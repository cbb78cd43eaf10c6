// Helpers shared by the kernels: dtype tags, 16-byte vectors, float conversion.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "muxserve_kernels.h"

namespace muxserve {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC elements of T in one 16-byte load.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[kSize];
  };
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::kSize]) {
  Vec<T> x;
  x.raw = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = to_float(x.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::kSize]) {
  Vec<T> x;
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) x.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = x.raw;
}

constexpr int next_pow2(int x) { return x <= 1 ? 1 : 2 * next_pow2((x + 1) / 2); }
constexpr int cmin(int a, int b) { return a < b ? a : b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Launch status: the launch error (cudaSuccess == 0) after a kernel launch.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace muxserve

// Kernel launches and dynamic shared memory go through these two macros so that
// csrc/emulation/ can run the same source on a CPU (see docs/kernels.md).
#ifndef MUXSERVE_LAUNCH
#define MUXSERVE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
#ifndef MUXSERVE_DYNAMIC_SHARED
#define MUXSERVE_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// Runs the statement for the pool's dtype; an unknown dtype returns MUXSERVE_E_DTYPE.
#define MUXSERVE_DISPATCH_DTYPE(dtype, T, ...)        \
  switch (dtype) {                                    \
    case MUXSERVE_F32: {                              \
      using T = float;                                \
      __VA_ARGS__;                                    \
    }                                                 \
    case MUXSERVE_F16: {                              \
      using T = __half;                               \
      __VA_ARGS__;                                    \
    }                                                 \
    case MUXSERVE_BF16: {                             \
      using T = __nv_bfloat16;                        \
      __VA_ARGS__;                                    \
    }                                                 \
    default:                                          \
      return MUXSERVE_E_DTYPE;                        \
  }
