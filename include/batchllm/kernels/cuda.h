// CUDA launchers of the attention kernels (only when the library is built with BATCHLLM_WITH_CUDA).
// Same parameter structs as the CPU references (batchllm/kernels.h); every pointer is device memory
// except the host-side sizes and hints inside the structs. Each launcher checks its launches and
// returns the first error (cudaSuccess when all went well). Supported: fp16 and bf16 views, head dim
// 64 and 128 (cuda_head_dim_supported), any GQA ratio that divides; the attention launchers also
// need a positive, finite scale and cache strides of dims 0 and 1 below 2^32 bytes (else
// cudaErrorInvalidValue, before any launch).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "batchllm/kernels.h"

namespace batchllm::kernels {

/// Whether the CUDA kernels were instantiated for this head dim.
bool cuda_head_dim_supported(int64_t head_dim);

/// The tile kernel that prefill (`prefill`) or cascade-prefix tiles of `head_dim` run on the current
/// device under the current environment (BATCHLLM_ATTENTION_TILES): "wmma", "mma", "mma128", "wgmma",
/// "wgmma-pipe", "wgmma64" or "wgmma-k128" ("wgmma", "wgmma-pipe" or "wgmma-k128" asked for where the
/// build has no sm_90a code or the device is not compute 9.0 runs, and reads, "mma128"; "wgmma64"
/// reads "mma").
const char* cuda_tile_kernel_name(bool prefill, int64_t head_dim);

/// float32 elements of scratch that cascade_decode_attention_cuda needs in params.workspace.
/// Depends on the current device's multiprocessor count (split-KV), so size it on the launch device.
/// \param num_rows B   \param num_q_heads Hq   \param num_kv_heads Hkv   \param levels sizes and host hints
/// \param device_suffix_split levels.suffix_split will be set (room for any split it may ask for).
/// \param device_prefix_split levels.prefix_split will be set (room for any split within the hints' plan).
size_t cascade_workspace_floats(int64_t num_rows, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                const DecodeLevelsView& levels, bool device_suffix_split = false,
                                bool device_prefix_split = false);

/// DecodeLevelsView::prefix_split for a step whose prefixes (`num_prefixes`, at most `max_rows`
/// readers and `max_len` keys each) are launched with the hints of a CUDA graph's bucket
/// (`bucket_prefixes`, `bucket_rows`, `bucket_len`): {splits, chunk_keys, state_rows}, the split the
/// step would get launched at its own size, at most what the bucket plan's items hold (on the current
/// device and tile kernel: the split follows its occupancy and the SM count).
std::array<int32_t, 3> cascade_prefix_split(int64_t num_prefixes, int64_t max_rows, int64_t max_len,
                                            int64_t bucket_prefixes, int64_t bucket_rows, int64_t bucket_len,
                                            int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, DType dtype);

/// DecodeLevelsView::suffix_split for a step of `rows` decode rows (their longest suffix
/// `max_suffix_kv_len` keys) launched as `padded_rows` rows (a CUDA graph's batch bucket): {splits,
/// chunk_keys, rows covered}, the split the same step would get launched at its own size (on the
/// current device: the split follows its multiprocessor count). A launch with this array and a
/// workspace of cascade_workspace_floats(padded_rows, ..., true) holds it whatever the rows.
std::array<int32_t, 3> cascade_suffix_split(int64_t rows, int64_t padded_rows, int64_t num_q_heads,
                                            int64_t num_kv_heads, int64_t max_suffix_kv_len);

cudaError_t store_kv_cuda(const StoreKvParams& params, cudaStream_t stream);
cudaError_t prefill_attention_cuda(const PrefillParams& params, cudaStream_t stream);
cudaError_t cascade_decode_attention_cuda(const CascadeDecodeParams& params, cudaStream_t stream);
cudaError_t merge_states_cuda(const MergeStatesParams& params, cudaStream_t stream);
cudaError_t sample_rows_cuda(const SampleRowsParams& params, cudaStream_t stream);
cudaError_t rms_norm_cuda(const RmsNormParams& params, cudaStream_t stream);
cudaError_t silu_and_mul_cuda(const SiluAndMulParams& params, cudaStream_t stream);
cudaError_t rotary_embedding_cuda(const RotaryParams& params, cudaStream_t stream);

}  // namespace batchllm::kernels
