// The torch binding of the kernels: checks tensors, then calls the extern "C" launchers.
//
// No CUDA header is included (the launchers live in a shared library nvcc builds from the .cu
// files), so this file compiles against any torch, and the caller passes the CUDA stream as
// the integer `torch.cuda.current_stream().cuda_stream`.
#include <torch/extension.h>

#include <string>

#include "muxserve_kernels.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return MUXSERVE_F32;
    case at::kHalf:
      return MUXSERVE_F16;
    case at::kBFloat16:
      return MUXSERVE_BF16;
    default:
      TORCH_CHECK(false, "muxserve kernels: unsupported dtype ", t.scalar_type());
  }
}

void check_status(int status, const char* what) {
  if (status == 0) return;
  std::string why;
  switch (status) {
    case MUXSERVE_E_DTYPE:
      why = "unsupported dtype";
      break;
    case MUXSERVE_E_HEAD_DIM:
      why = "no kernel compiled for this head size";
      break;
    case MUXSERVE_E_ALIGN:
      why = "a row or block is not 16-byte aligned";
      break;
    case MUXSERVE_E_SHAPE:
      why = "unsupported shape";
      break;
    default:
      why = "CUDA error " + std::to_string(status) + " at launch";
  }
  TORCH_CHECK(false, "muxserve ", what, ": ", why);
}

void check_cuda(const at::Tensor& t, const char* name) {
#ifdef MUXSERVE_EMULATION  // linked with the CPU emulation of the kernels (csrc/emulation/)
  TORCH_CHECK(t.is_cpu(), "muxserve kernels (emulated): ", name, " must be a CPU tensor");
#else
  TORCH_CHECK(t.is_cuda(), "muxserve kernels: ", name, " must be a CUDA tensor");
#endif
}

// The pool view (num_blocks, 2, tokens_per_block, head_dim) as KVPool.view makes it.
MuxPool pool_of(const at::Tensor& cache) {
  check_cuda(cache, "cache");
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == 2, "cache must be (blocks, 2, tpb, head_dim)");
  const int64_t tpb = cache.size(2), hd = cache.size(3);
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == hd && cache.stride(1) == tpb * hd,
              "cache must be the pool's view: (blocks, 2, tpb, hd) with strides (*, tpb*hd, hd, 1)");
  return MuxPool{cache.data_ptr(), cache.stride(0), static_cast<int32_t>(tpb),
                 static_cast<int32_t>(hd), dtype_code(cache)};
}

MuxTables tables_of(const at::Tensor& tables, int64_t layer) {
  check_cuda(tables, "block_tables");
  TORCH_CHECK(tables.dim() == 4 && tables.scalar_type() == at::kLong,
              "block_tables must be (seqs, max_logical, layers, kv_heads) int64");
  TORCH_CHECK(layer >= 0 && layer < tables.size(2), "layer ", layer, " out of range");
  return MuxTables{tables.data_ptr<int64_t>(), tables.stride(0), tables.stride(1),
                   tables.stride(2), tables.stride(3), static_cast<int32_t>(layer)};
}

MuxRows rows_of(const at::Tensor& t, const at::Tensor& cache, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 3 && t.size(2) == cache.size(3), name, " must be (rows, heads, head_dim)");
  TORCH_CHECK(t.stride(2) == 1, name, " must have a contiguous last dimension");
  TORCH_CHECK(t.scalar_type() == cache.scalar_type(), name, " must have the cache's dtype");
  return MuxRows{t.data_ptr(), t.stride(0), t.stride(1)};
}

const int64_t* index_of(const at::Tensor& t, int64_t n, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kLong && t.stride(0) == 1,
              name, " must be a contiguous (", n, ",) int64 tensor");
  return t.data_ptr<int64_t>();
}

// The stream handle for a launch on `on`'s device, that device made current for the kernels'
// runtime first (torch's current device is its own runtime's, not the one linked into them).
muxserve_stream_t stream_of(int64_t stream, const at::Tensor& on) {
  check_status(muxserve_use_device(static_cast<int32_t>(on.get_device())), "set device");
  return reinterpret_cast<muxserve_stream_t>(static_cast<intptr_t>(stream));
}

void write_kv(const at::Tensor& cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& block_tables, const at::Tensor& seq_of_token,
              const at::Tensor& pos_of_token, int64_t layer, int64_t stream) {
  const MuxPool pool = pool_of(cache);
  const MuxRows kr = rows_of(k, cache, "k"), vr = rows_of(v, cache, "v");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(block_tables.size(3) == k.size(1), "block_tables has ", block_tables.size(3),
              " kv heads, k has ", k.size(1));
  const int64_t n = k.size(0);
  check_status(
      muxserve_write_kv(pool, tables_of(block_tables, layer), kr, vr,
                        index_of(seq_of_token, n, "seq_of_token"),
                        index_of(pos_of_token, n, "pos_of_token"), static_cast<int32_t>(n),
                        static_cast<int32_t>(k.size(1)), stream_of(stream, cache)),
      "write_kv");
}

void decode_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      int64_t layer, int64_t window, double scale, int64_t num_splits,
                      int64_t partition_size, const c10::optional<at::Tensor>& workspace,
                      int64_t stream) {
  const MuxPool pool = pool_of(cache);
  MuxDecode p{};
  p.out = rows_of(out, cache, "out");
  p.q = rows_of(q, cache, "q");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  const int64_t n = q.size(0);
  TORCH_CHECK(block_tables.size(0) >= n, "block_tables has fewer rows than q");
  p.context_lens = index_of(context_lens, n, "context_lens");
  p.num_seqs = static_cast<int32_t>(n);
  p.num_heads = static_cast<int32_t>(q.size(1));
  p.num_kv_heads = static_cast<int32_t>(block_tables.size(3));
  p.window = static_cast<int32_t>(window);
  p.scale = static_cast<float>(scale);
  p.num_splits = static_cast<int32_t>(num_splits);
  p.partition_size = static_cast<int32_t>(partition_size);
  p.workspace = nullptr;
  const int64_t need = muxserve_decode_workspace_floats(p.num_seqs, p.num_heads,
                                                        pool.head_dim, p.num_splits);
  if (need > 0) {
    TORCH_CHECK(workspace.has_value(), "decode_attention: ", num_splits,
                " splits need a workspace");
    const at::Tensor& ws = *workspace;
    check_cuda(ws, "workspace");
    TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.numel() >= need,
                "workspace must be a contiguous float32 tensor of ", need, " elements");
    p.workspace = ws.data_ptr<float>();
  }
  check_status(
      muxserve_decode_attention(pool, tables_of(block_tables, layer), p, stream_of(stream, cache)),
      "decode_attention");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MuxServe CUDA kernels over the unified head-wise KV pool";
  m.def("write_kv", &write_kv, "Write new K/V into the pool through the block tables");
  m.def("decode_attention", &decode_attention, "Paged decode attention over the pool");
  m.def(
      "decode_workspace_floats",
      [](int64_t seqs, int64_t heads, int64_t head_dim, int64_t splits) {
        return muxserve_decode_workspace_floats(static_cast<int32_t>(seqs),
                                                static_cast<int32_t>(heads),
                                                static_cast<int32_t>(head_dim),
                                                static_cast<int32_t>(splits));
      },
      "Floats of workspace a decode launch with `splits` splits needs");
  m.def(
      "supports_head_dim",
      [](int64_t head_dim) {
        return muxserve_decode_supports_head_dim(static_cast<int32_t>(head_dim)) != 0;
      },
      "Whether a decode kernel is compiled for this head size");
}
