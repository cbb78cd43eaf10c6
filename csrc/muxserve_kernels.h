/* MuxServe kernels over the unified head-wise KV pool: the C interface.
 *
 * Plain C, no CUDA or torch headers: csrc/bindings.cpp (the torch binding) includes it, and
 * every .cu file implements its part. Launchers return 0 on success, a cudaError_t (> 0) from
 * the launch, or a MUXSERVE_E_* code (< 0) for arguments the kernels do not support.
 *
 * Layouts (element = one value of the pool's dtype; see docs/kernels.md):
 *   pool     the model's typed view of the pool: block b starts at b * block_stride; K of the
 *            block is (tokens_per_block, head_dim) row-major, V follows at + tokens_per_block *
 *            head_dim. A physical block holds one (layer, kv head) of tokens_per_block tokens.
 *   tables   block ids, (num_seqs, max_logical, num_layers, num_kv_heads) int64, any strides:
 *            token p of sequence s, kv head h, layer l lives in block
 *            tables[s, p / tokens_per_block, l, h] at row p % tokens_per_block.
 */
#ifndef MUXSERVE_KERNELS_H_
#define MUXSERVE_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* muxserve_stream_t; /* the same type as cudaStream_t */

enum { MUXSERVE_F32 = 0, MUXSERVE_F16 = 1, MUXSERVE_BF16 = 2 };

enum {
  MUXSERVE_E_DTYPE = -1,     /* dtype not one of MUXSERVE_F32/F16/BF16 */
  MUXSERVE_E_HEAD_DIM = -2,  /* head size without a compiled kernel */
  MUXSERVE_E_ALIGN = -3,     /* a row or block not aligned to 16 bytes */
  MUXSERVE_E_SHAPE = -4,     /* heads not a multiple of kv heads, a count < 1, ... */
};

/* The model's view of the pool. */
typedef struct {
  void* data;               /* block 0, K, token 0, dim 0 */
  int64_t block_stride;     /* elements from one block to the next: block_bytes / dtype size */
  int32_t tokens_per_block; /* tokens of one (layer, kv head) per block */
  int32_t head_dim;
  int32_t dtype;            /* MUXSERVE_F32, MUXSERVE_F16 or MUXSERVE_BF16 */
} MuxPool;

/* One layer's slice of the block tables. */
typedef struct {
  const int64_t* data;
  int64_t stride_seq, stride_logical, stride_layer, stride_head; /* in elements */
  int32_t layer;
} MuxTables;

/* (rows, heads, head_dim) of the pool's dtype with the last dimension contiguous. */
typedef struct {
  void* data;
  int64_t stride_row, stride_head; /* in elements */
} MuxRows;

/* Write new K/V: token t (sequence seq_of_token[t], position pos_of_token[t]) of every kv head
 * goes to its block at row pos % tokens_per_block. A token with pos < 0 is padding (a CUDA-graph
 * bucket's unused row): nothing is written for it. */
int muxserve_write_kv(MuxPool pool, MuxTables tables, MuxRows k, MuxRows v,
                      const int64_t* seq_of_token, const int64_t* pos_of_token,
                      int32_t num_tokens, int32_t num_kv_heads, muxserve_stream_t stream);

/* Paged decode attention: one query token per sequence, at position context_lens[s] - 1, over
 * the keys at positions [max(0, ctx - window), ctx) (window <= 0: no window). Query head h reads
 * kv head h / (num_heads / num_kv_heads). Softmax in fp32, online. With num_splits > 1 the
 * context is cut in partitions of partition_size tokens (the last one takes the rest) whose
 * partial results go to `workspace` and are merged by a second kernel. A sequence with
 * context_lens <= 0 is padding: its output is zeros. Every element of `out` is written. */
typedef struct {
  MuxRows out;                 /* (num_seqs, num_heads, head_dim) */
  MuxRows q;                   /* (num_seqs, num_heads, head_dim) */
  const int64_t* context_lens; /* (num_seqs,) */
  int32_t num_seqs, num_heads, num_kv_heads;
  int32_t window;
  float scale;                 /* softmax scale, usually 1 / sqrt(head_dim) */
  int32_t num_splits, partition_size;
  float* workspace;            /* muxserve_decode_workspace_floats(...) floats, or NULL */
} MuxDecode;

/* Floats of workspace a decode launch needs (0 when num_splits == 1). */
int64_t muxserve_decode_workspace_floats(int32_t num_seqs, int32_t num_heads, int32_t head_dim,
                                         int32_t num_splits);

int muxserve_decode_attention(MuxPool pool, MuxTables tables, MuxDecode p,
                              muxserve_stream_t stream);

/* Makes `device` current for this library's CUDA runtime in the calling thread (it is linked
 * statically, so torch's current device is not its own); a device < 0 does nothing. */
int muxserve_use_device(int32_t device);

/* Whether a decode kernel is compiled for this head size (1) or not (0). */
int muxserve_decode_supports_head_dim(int32_t head_dim);

#ifdef __cplusplus
}
#endif

#endif /* MUXSERVE_KERNELS_H_ */
