// Paged decode attention over the head-wise pool: one query token per sequence.
//
// A CTA handles one sequence, one kv head (and up to GMAX of the query heads that read it, so
// K/V are read once per kv head under GQA) and one split of the context. Its 128 threads form
// groups of TPR threads; a group reads one token's K and V row with 16-byte loads (TPR a power
// of two, so dot products reduce with xor shuffles), and keeps its own online-softmax state
// (running max m, sum l, accumulator) over the tokens it visits. No barrier until the end,
// where the groups' states are merged through shared memory. With several splits a second
// kernel merges the splits' (m, l, acc). Scores are kept in log2 units (q is pre-scaled by
// scale * log2(e)), so exp2f does the exponentials.
#include <math.h>

#include "common.cuh"

namespace muxserve {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;  // tokens each group has in flight per iteration
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int HD>
struct Shape {
  static constexpr int VEC = Vec<T>::kSize;            // elements per 16-byte load
  static constexpr int NVEC = HD / VEC;                // 16-byte vectors per row
  static constexpr int TPR = cmin(32, next_pow2(NVEC));  // threads per row (token)
  static constexpr int NV = (NVEC + TPR - 1) / TPR;    // vectors per thread
  static constexpr int GROUPS = kThreads / TPR;        // rows (tokens) per pass
  static_assert(HD % VEC == 0, "head size must be a multiple of 16 bytes");
};

template <typename T, int HD, int GMAX>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(MuxPool pool, MuxTables tables, MuxDecode p) {
  using S = Shape<T, HD>;
  constexpr int VEC = S::VEC, NV = S::NV, TPR = S::TPR, GROUPS = S::GROUPS;

  const int group_size = p.num_heads / p.num_kv_heads;
  const int num_sub = (group_size + GMAX - 1) / GMAX;
  const int kvh = blockIdx.x / num_sub;
  const int sub = blockIdx.x % num_sub;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int head0 = kvh * group_size + sub * GMAX;  // first query head of this CTA
  const int nheads = min(GMAX, group_size - sub * GMAX);
  const int lane = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;

  // this split's token range [lo, hi)
  const int64_t ctx = p.context_lens[seq];
  int64_t lo = 0, hi = 0;
  if (ctx > 0) {
    const int64_t first = p.window > 0 ? max(int64_t(0), ctx - p.window) : int64_t(0);
    lo = first + int64_t(split) * p.partition_size;
    hi = split == p.num_splits - 1 ? ctx : min(ctx, lo + p.partition_size);
  }

  // this thread's slice of each query head, pre-scaled into log2 units
  float q[GMAX][NV][VEC];
  const float qscale = p.scale * kLog2e;
  const T* qbase = static_cast<const T*>(p.q.data) + seq * p.q.stride_row;
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int vi = lane + j * TPR;
      if (g < nheads && vi < S::NVEC) {
        load_vec(qbase + (head0 + g) * p.q.stride_head + vi * VEC, q[g][j]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[g][j][e] *= qscale;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[g][j][e] = 0.f;
      }
    }
  }

  float m[GMAX], l[GMAX], acc[GMAX][NV][VEC];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[g][j][e] = 0.f;
  }

  const T* cache = static_cast<const T*>(pool.data);
  const int tpb = pool.tokens_per_block;
  const int64_t* table = tables.data + seq * tables.stride_seq +
                         int64_t(tables.layer) * tables.stride_layer + kvh * tables.stride_head;

  // Every thread runs the same iterations (shuffles need the whole warp); tokens past `hi`
  // load nothing and update nothing.
  for (int64_t it = lo; it < hi; it += GROUPS * kUnroll) {
    Vec<T> kraw[kUnroll][NV], vraw[kUnroll][NV];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = it + u * GROUPS + grp;
      valid[u] = t < hi;
      const T* row = nullptr;
      if (valid[u]) {
        // 32-bit division: positions are < 2^31, and 64-bit division costs ~3x the instructions
        const int pos = int(t);
        const int logical = pos / tpb;
        const int64_t blk = table[logical * tables.stride_logical];
        row = cache + blk * pool.block_stride + (pos - logical * tpb) * HD;
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int vi = lane + j * TPR;
        if (valid[u] && vi < S::NVEC) {
          kraw[u][j].raw = __ldg(reinterpret_cast<const uint4*>(row + vi * VEC));
          vraw[u][j].raw = __ldg(reinterpret_cast<const uint4*>(row + int64_t(tpb) * HD + vi * VEC));
        } else {
          kraw[u][j].raw = make_uint4(0, 0, 0, 0);
          vraw[u][j].raw = make_uint4(0, 0, 0, 0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float s[GMAX];
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < NV; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot += q[g][j][e] * to_float(kraw[u][j].v[e]);
#pragma unroll
        for (int off = TPR / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        s[g] = dot;
      }
      if (valid[u]) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          const float m_new = fmaxf(m[g], s[g]);
          const float c = exp2f(m[g] - m_new);
          const float w = exp2f(s[g] - m_new);
          l[g] = l[g] * c + w;
#pragma unroll
          for (int j = 0; j < NV; ++j)
#pragma unroll
            for (int e = 0; e < VEC; ++e)
              acc[g][j][e] = acc[g][j][e] * c + w * to_float(vraw[u][j].v[e]);
          m[g] = m_new;
        }
      }
    }
  }

  // merge the groups' states
  __shared__ float sm_m[GROUPS][GMAX];
  __shared__ float sm_l[GROUPS][GMAX];
  __shared__ float sm_acc[GROUPS][GMAX][HD];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (lane == 0) {
      sm_m[grp][g] = m[g];
      sm_l[grp][g] = l[g];
    }
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int vi = lane + j * TPR;
      if (vi < S::NVEC)
#pragma unroll
        for (int e = 0; e < VEC; ++e) sm_acc[grp][g][vi * VEC + e] = acc[g][j][e];
    }
  }
  __syncthreads();

  const int num_bh = p.num_seqs * p.num_heads;
  for (int idx = threadIdx.x; idx < nheads * HD; idx += kThreads) {
    const int g = idx / HD, d = idx % HD;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < GROUPS; ++r) mx = fmaxf(mx, sm_m[r][g]);
    float a = 0.f, sum = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int r = 0; r < GROUPS; ++r) {
        const float w = exp2f(sm_m[r][g] - mx);  // a group that saw nothing: exp2(-inf) = 0
        a += w * sm_acc[r][g][d];
        sum += w * sm_l[r][g];
      }
    }
    const int head = head0 + g;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out.data) + seq * p.out.stride_row + head * p.out.stride_head;
      out[d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
    } else {
      const int64_t slot = (int64_t(seq) * p.num_heads + head) * p.num_splits + split;
      float* ws_m = p.workspace;
      float* ws_l = ws_m + int64_t(num_bh) * p.num_splits;
      float* ws_acc = ws_l + int64_t(num_bh) * p.num_splits;
      ws_acc[slot * HD + d] = a;
      if (d == 0) {
        ws_m[slot] = mx;
        ws_l[slot] = sum;
      }
    }
  }
}

// Merges the splits of one (sequence, query head): out = sum_s w_s acc_s / sum_s w_s l_s with
// w_s = 2^(m_s - max m).
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(MuxDecode p, int32_t head_dim) {
  MUXSERVE_DYNAMIC_SHARED(float, weights);  // (num_splits,)
  __shared__ float total;
  const int bh = blockIdx.x;
  const int seq = bh / p.num_heads, head = bh % p.num_heads;
  const int64_t num_slots = int64_t(p.num_seqs) * p.num_heads * p.num_splits;
  const int64_t first = int64_t(bh) * p.num_splits;
  const float* ws_m = p.workspace + first;
  const float* ws_l = p.workspace + num_slots + first;
  const float* ws_acc = p.workspace + 2 * num_slots + first * head_dim;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, ws_m[s]);
  for (int s = threadIdx.x; s < p.num_splits; s += kThreads)
    weights[s] = mx == -INFINITY ? 0.f : exp2f(ws_m[s] - mx);
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int s = 0; s < p.num_splits; ++s) sum += weights[s] * ws_l[s];
    total = sum;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out.data) + seq * p.out.stride_row + head * p.out.stride_head;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float a = 0.f;
    for (int s = 0; s < p.num_splits; ++s) a += weights[s] * ws_acc[int64_t(s) * head_dim + d];
    out[d] = from_float<T>(total > 0.f ? a / total : 0.f);
  }
}

template <typename T, int HD, int GMAX>
int launch_gmax(const MuxPool& pool, const MuxTables& tables, const MuxDecode& p,
                muxserve_stream_t stream) {
  const int group_size = p.num_heads / p.num_kv_heads;
  const int num_sub = (group_size + GMAX - 1) / GMAX;
  const dim3 grid(p.num_kv_heads * num_sub, p.num_seqs, p.num_splits);
  auto decode = decode_kernel<T, HD, GMAX>;
  MUXSERVE_LAUNCH(decode, grid, kThreads, 0, stream, pool, tables, p);
  int status = launch_status();
  if (status != 0 || p.num_splits == 1) return status;
  const size_t smem = sizeof(float) * p.num_splits;
  auto merge = merge_kernel<T>;
  MUXSERVE_LAUNCH(merge, p.num_seqs * p.num_heads, kThreads, smem, stream, p, HD);
  return launch_status();
}

template <typename T, int HD>
int launch_hd(const MuxPool& pool, const MuxTables& tables, const MuxDecode& p,
              muxserve_stream_t stream) {
  const int group_size = p.num_heads / p.num_kv_heads;
  if (group_size == 1) return launch_gmax<T, HD, 1>(pool, tables, p, stream);
  if (group_size == 2) return launch_gmax<T, HD, 2>(pool, tables, p, stream);
  if (group_size <= 4) return launch_gmax<T, HD, 4>(pool, tables, p, stream);
  return launch_gmax<T, HD, 8>(pool, tables, p, stream);  // larger groups: several CTAs
}

// The head sizes with a compiled kernel (every Llama-family size in use, and the demo models').
#define MUXSERVE_FOR_HEAD_DIMS(X) X(16) X(32) X(64) X(80) X(96) X(128) X(256)

template <typename T>
int launch(const MuxPool& pool, const MuxTables& tables, const MuxDecode& p,
           muxserve_stream_t stream) {
  switch (pool.head_dim) {
#define MUXSERVE_CASE(hd) \
  case hd:                \
    return launch_hd<T, hd>(pool, tables, p, stream);
    MUXSERVE_FOR_HEAD_DIMS(MUXSERVE_CASE)
#undef MUXSERVE_CASE
    default:
      return MUXSERVE_E_HEAD_DIM;
  }
}

}  // namespace
}  // namespace muxserve

extern "C" int muxserve_decode_supports_head_dim(int32_t head_dim) {
  switch (head_dim) {
#define MUXSERVE_CASE(hd) \
  case hd:                \
    return 1;
    MUXSERVE_FOR_HEAD_DIMS(MUXSERVE_CASE)
#undef MUXSERVE_CASE
    default:
      return 0;
  }
}

extern "C" int64_t muxserve_decode_workspace_floats(int32_t num_seqs, int32_t num_heads,
                                                    int32_t head_dim, int32_t num_splits) {
  if (num_splits <= 1) return 0;
  return int64_t(num_seqs) * num_heads * num_splits * (int64_t(head_dim) + 2);
}

extern "C" int muxserve_decode_attention(MuxPool pool, MuxTables tables, MuxDecode p,
                                         muxserve_stream_t stream) {
  using namespace muxserve;
  if (p.num_seqs < 0 || p.num_seqs > 65535 || p.num_heads < 1 || p.num_kv_heads < 1 ||
      p.num_heads % p.num_kv_heads != 0 || pool.tokens_per_block < 1 || p.num_splits < 1 ||
      p.num_splits > 8192 || (p.num_splits > 1 && (p.partition_size < 1 || !p.workspace)))
    return MUXSERVE_E_SHAPE;
  if (!muxserve_decode_supports_head_dim(pool.head_dim)) return MUXSERVE_E_HEAD_DIM;
  if (p.num_seqs == 0) return 0;
  MUXSERVE_DISPATCH_DTYPE(pool.dtype, T, {
    constexpr int es = sizeof(T);
    if (!aligned16(pool.data) || (pool.block_stride * es) % 16 != 0 || !aligned16(p.q.data) ||
        (p.q.stride_row * es) % 16 != 0 || (p.q.stride_head * es) % 16 != 0)
      return MUXSERVE_E_ALIGN;
    return launch<T>(pool, tables, p, stream);
  })
}
