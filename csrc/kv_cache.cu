// Writing new K/V into the head-wise pool through the block tables (vLLM's reshape_and_cache,
// with one block per (layer, kv head) instead of one per layer).
#include "common.cuh"

namespace muxserve {
namespace {

// One thread per `Unit` of a (token, kv head) row; a row is head_dim * elem_bytes bytes.
template <typename Unit>
__global__ void write_kv_kernel(char* __restrict__ pool, int64_t block_bytes, int32_t tpb,
                                int64_t row_bytes, MuxTables tables, const char* __restrict__ k,
                                int64_t k_row, int64_t k_head, const char* __restrict__ v,
                                int64_t v_row, int64_t v_head,
                                const int64_t* __restrict__ seq_of_token,
                                const int64_t* __restrict__ pos_of_token, int32_t num_tokens,
                                int32_t num_kv_heads) {
  const int64_t units = row_bytes / sizeof(Unit);
  const int64_t total = int64_t(num_tokens) * num_kv_heads * units;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t u = i % units;
    const int64_t th = i / units;
    const int32_t h = int32_t(th % num_kv_heads);
    const int64_t t = th / num_kv_heads;
    const int64_t pos = pos_of_token[t];
    if (pos < 0) continue;  // padding row of a CUDA-graph bucket
    const int64_t blk = tables.data[seq_of_token[t] * tables.stride_seq +
                                    (pos / tpb) * tables.stride_logical +
                                    int64_t(tables.layer) * tables.stride_layer +
                                    h * tables.stride_head];
    char* base = pool + blk * block_bytes + (pos % tpb) * row_bytes;
    const Unit kx = reinterpret_cast<const Unit*>(k + t * k_row + h * k_head)[u];
    const Unit vx = reinterpret_cast<const Unit*>(v + t * v_row + h * v_head)[u];
    reinterpret_cast<Unit*>(base)[u] = kx;
    reinterpret_cast<Unit*>(base + int64_t(tpb) * row_bytes)[u] = vx;
  }
}

int elem_bytes(int32_t dtype) {
  switch (dtype) {
    case MUXSERVE_F32:
      return 4;
    case MUXSERVE_F16:
    case MUXSERVE_BF16:
      return 2;
    default:
      return 0;
  }
}

}  // namespace
}  // namespace muxserve

extern "C" int muxserve_use_device(int32_t device) {
  if (device < 0) return 0;
  int current = -1;
  cudaError_t status = cudaGetDevice(&current);
  if (status == cudaSuccess && current != device) status = cudaSetDevice(device);
  return static_cast<int>(status);
}

extern "C" int muxserve_write_kv(MuxPool pool, MuxTables tables, MuxRows k, MuxRows v,
                                 const int64_t* seq_of_token, const int64_t* pos_of_token,
                                 int32_t num_tokens, int32_t num_kv_heads,
                                 muxserve_stream_t stream) {
  using namespace muxserve;
  const int es = elem_bytes(pool.dtype);
  if (es == 0) return MUXSERVE_E_DTYPE;
  if (num_tokens < 0 || num_kv_heads < 1 || pool.tokens_per_block < 1 || pool.head_dim < 1)
    return MUXSERVE_E_SHAPE;
  if (num_tokens == 0) return 0;
  const int64_t row_bytes = int64_t(pool.head_dim) * es;
  const int64_t block_bytes = pool.block_stride * es;
  // 16-byte units where every row start is 16-byte aligned, else one element at a time
  const bool wide = row_bytes % 16 == 0 && block_bytes % 16 == 0 && aligned16(pool.data) &&
                    aligned16(k.data) && aligned16(v.data) && (k.stride_row * es) % 16 == 0 &&
                    (k.stride_head * es) % 16 == 0 && (v.stride_row * es) % 16 == 0 &&
                    (v.stride_head * es) % 16 == 0;
  const int64_t unit = wide ? 16 : es;
  const int64_t total = int64_t(num_tokens) * num_kv_heads * (row_bytes / unit);
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const int blocks = int(want < 65535 ? want : 65535);
  char* p = static_cast<char*>(pool.data);
  const char* kp = static_cast<const char*>(k.data);
  const char* vp = static_cast<const char*>(v.data);
  const int64_t kr = k.stride_row * es, kh = k.stride_head * es;
  const int64_t vr = v.stride_row * es, vh = v.stride_head * es;
  // one kernel per unit size; the names keep the launch macro's arguments free of commas
  auto wide_kernel = write_kv_kernel<uint4>;
  auto word_kernel = write_kv_kernel<uint32_t>;
  auto half_kernel = write_kv_kernel<uint16_t>;
  auto kernel = wide ? wide_kernel : es == 4 ? word_kernel : half_kernel;
  MUXSERVE_LAUNCH(kernel, blocks, threads, 0, stream, p, block_bytes, pool.tokens_per_block,
                  row_bytes, tables, kp, kr, kh, vp, vr, vh, seq_of_token, pos_of_token,
                  num_tokens, num_kv_heads);
  return launch_status();
}
