// A CPU emulation of the little of CUDA the kernels use, to run csrc/*.cu on a machine
// without a GPU (tests/runner/kernels/test_ops.py). Each CUDA thread of a block is a fiber (ucontext); the
// blocks of a grid run one after another, so `__shared__` can be a static. __syncthreads and
// warp shuffles are barriers between fibers; a barrier some threads never reach is reported
// as a deadlock instead of hanging. Not a performance model: it checks indexing and results.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

typedef int cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return 0;
}
inline cudaError_t cudaSetDevice(int) { return 0; }

inline dim3 blockIdx, threadIdx, blockDim, gridDim;

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- half types: bit patterns, converted with round-to-nearest-even ----------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  _Float16 f = static_cast<_Float16>(x);
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  __nv_bfloat16 b;
  if (isnan(x)) {
    b.bits = 0x7fc0;
  } else {
    b.bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}

// ---- the fiber scheduler -----------------------------------------------------------------
namespace emu {

constexpr size_t kStackBytes = 256 << 10;

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  bool done = false;
  int wait = -1;  // barrier id waited on, -1: runnable
  uint64_t wait_gen = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t main;
  int current = -1;
  std::vector<int> size, arrived;  // barrier 0: the block; 1 + w: warp w
  std::vector<uint64_t> gen;
  std::vector<float> lanes;  // one shuffle slot per thread
  std::vector<char> dynamic_shared;
  std::function<void()> body;
};

inline Block* g_block = nullptr;
inline std::vector<std::unique_ptr<char[]>> g_stacks;

[[noreturn]] inline void fail(const char* why) {
  fprintf(stderr, "cuda emulation: %s\n", why);
  abort();
}

inline void barrier(int id) {
  Block& b = *g_block;
  if (++b.arrived[id] == b.size[id]) {  // the last to arrive releases the others
    b.arrived[id] = 0;
    ++b.gen[id];
    return;
  }
  Fiber& f = b.fibers[b.current];
  f.wait = id;
  f.wait_gen = b.gen[id];
  swapcontext(&f.ctx, &b.main);
}

inline void trampoline() {
  Block& b = *g_block;
  b.body();
  b.fibers[b.current].done = true;  // returns to b.main through uc_link
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  const int n = int(block.x * block.y * block.z);
  const int warps = (n + 31) / 32;
  while (int(g_stacks.size()) < n) g_stacks.emplace_back(new char[kStackBytes]);
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        g_block = &b;
        blockIdx = dim3(x, y, z);
        b.body = [&] { kernel(args...); };
        b.size.push_back(n);
        for (int w = 0; w < warps; ++w) b.size.push_back(std::min(32, n - 32 * w));
        b.arrived.assign(b.size.size(), 0);
        b.gen.assign(b.size.size(), 0);
        b.lanes.assign(n, 0.f);
        b.dynamic_shared.assign(smem + 16, 0);
        b.fibers.resize(n);
        for (int t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f.linear = t;
          f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = g_stacks[t].get();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &b.main;
          makecontext(&f.ctx, trampoline, 0);
        }
        for (int left = n; left > 0;) {
          bool ran = false;
          for (int t = 0; t < n; ++t) {
            Fiber& f = b.fibers[t];
            if (f.done || (f.wait >= 0 && b.gen[f.wait] == f.wait_gen)) continue;
            f.wait = -1;
            b.current = t;
            threadIdx = f.tid;
            swapcontext(&b.main, &f.ctx);
            ran = true;
            if (f.done) --left;
          }
          if (!ran) fail("deadlock: a barrier or shuffle that not every thread reaches");
        }
        g_block = nullptr;
      }
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(g_block->dynamic_shared.data());
}

}  // namespace emu

inline void __syncthreads() { emu::barrier(0); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  emu::Block& b = *emu::g_block;
  const int t = b.fibers[b.current].linear;
  const int warp = t / 32;
  b.lanes[t] = v;
  emu::barrier(1 + warp);
  const int src = warp * 32 + ((t % 32) ^ lane_mask);
  const float r = src < int(b.lanes.size()) ? b.lanes[src] : v;
  emu::barrier(1 + warp);
  return r;
}

#define MUXSERVE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu::launch(kernel, dim3(grid), dim3(block), size_t(smem), __VA_ARGS__)
#define MUXSERVE_DYNAMIC_SHARED(T, name) T* name = emu::dynamic_shared<T>()
