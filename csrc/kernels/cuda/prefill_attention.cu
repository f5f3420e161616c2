// CUDA prefill_attention: ragged causal attention of a step's query rows over their paged context.
// Grid: (row tiles of the longest sequence, sequences, KV heads). A tile's 64 (128 with mma128) rows are the
// (token, GQA head) pairs of one sequence and KV head, token-major, so the group's heads share
// every K/V tile they load.
#include "batchllm/kernels/cuda.h"
#include "kernels/cuda/tile_kernels.cuh"

namespace batchllm::kernels {

namespace cuda {
namespace {

template <typename T>
struct PrefillProblem {
  TensorView q, o;
  const int32_t* block_tables;
  int64_t max_blocks_per_seq;
  const int32_t* query_start;
  const int32_t* context_lens;
  int group;
  int tile_rows;  // rows per tile: the kernel's (tile_rows(kernel))
  int row_tiles;  // the grid's x: row tiles of the longest sequence

  /// The row tile of work item x: the last rows first. A sequence's later rows attend to more keys
  /// (causal), so the CTAs dispatched first are the longest and the grid ends on short tiles instead
  /// of a tail of long ones.
  __device__ int row_tile(const dim3& item) const { return row_tiles - 1 - static_cast<int>(item.x); }

  __device__ bool setup(TileRows<T>& rows, const dim3& item) const {
    const int seq = item.y;
    const int q_len = query_start[seq + 1] - query_start[seq];
    const int first = row_tile(item) * tile_rows;
    if (first >= q_len * group) return false;
    // The last used row's token attends to the most keys, the first one's to the fewest (causal).
    const int last_token = (min(first + tile_rows, q_len * group) - 1) / group;
    rows.num_keys = context_lens[seq] - q_len + last_token + 1;
    rows.unmasked_end = context_lens[seq] - q_len + first / group + 1;
    rows.blocks = block_tables + seq * max_blocks_per_seq;
    rows.kv_head = item.z;
    return true;
  }

  __device__ void setup_row(TileRows<T>& rows, const dim3& item, int r) const {
    const int seq = item.y;
    const int q_begin = query_start[seq];
    const int q_len = query_start[seq + 1] - q_begin;
    const int idx = row_tile(item) * tile_rows + r;
    const int j = idx / group;
    if (r < tile_rows && j < q_len) {
      const int head = static_cast<int>(item.z) * group + idx % group;
      rows.q[r] = static_cast<const T*>(q.data) + (q_begin + j) * q.stride[0] + head * q.stride[1];
      rows.key_limit[r] = context_lens[seq] - q_len + j + 1;  // causal: keys 0..position
    } else {
      rows.q[r] = nullptr;
      rows.key_limit[r] = 0;
    }
  }

  __device__ void write(const dim3& item, int r, const float* o_row, float inv_sum, float /*lse*/, int lane) const {
    const int idx = row_tile(item) * tile_rows + r;
    const int64_t row = query_start[item.y] + idx / group;
    const int head = item.z * group + idx % group;
    T* dst = static_cast<T*>(o.data) + row * o.stride[0] + head * o.stride[1];
    for (int d = lane; d < o.shape[2]; d += 32) dst[d] = from_float<T>(o_row[d] * inv_sum);
  }
};

}  // namespace
}  // namespace cuda

const char* cuda_tile_kernel_name(bool prefill, int64_t head_dim) {
  switch (cuda::tile_kernel(prefill ? cuda::TileUse::kPrefill : cuda::TileUse::kPrefix, head_dim)) {
    case cuda::TileKernel::kMma:
      return "mma";
    case cuda::TileKernel::kMma128:
      return "mma128";
    case cuda::TileKernel::kWgmma:
      return "wgmma";
    case cuda::TileKernel::kWgmmaPipelined:
      return "wgmma-pipe";
    case cuda::TileKernel::kWgmma64:
      return "wgmma64";
    case cuda::TileKernel::kWgmmaWide:
      return "wgmma-k128";
    default:
      return "wmma";
  }
}

cudaError_t prefill_attention_cuda(const PrefillParams& p, cudaStream_t stream) {
  if (!cuda::attention_args_fit(p.k_cache, p.v_cache, p.scale)) return cudaErrorInvalidValue;
  const int num_kv_heads = static_cast<int>(p.k_cache.shape[2]);
  const int group = static_cast<int>(p.q.shape[1]) / num_kv_heads;
  const cuda::TileKernel kernel = cuda::tile_kernel(cuda::TileUse::kPrefill, p.q.shape[2]);
  const int rows = cuda::tile_rows(kernel);
  const dim3 grid((p.max_q_len * group + rows - 1) / rows, static_cast<unsigned>(p.num_seqs), num_kv_heads);
  return BATCHLLM_DISPATCH_HALF_TYPES(p.q.dtype, [&] {
    return BATCHLLM_DISPATCH_HEAD_DIM(p.q.shape[2], [&] {
      cuda::PrefillProblem<scalar_t> problem{p.q, p.o, p.block_tables, p.max_blocks_per_seq, p.query_start,
                                             p.context_lens, group, rows, static_cast<int>(grid.x)};
      return cuda::launch_tiles<scalar_t, kHeadDim>(kernel, problem, grid, p.k_cache, p.v_cache, p.scale, stream);
    });
  });
}

}  // namespace batchllm::kernels
