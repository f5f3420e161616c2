// One tile of paged attention on tensor cores (WMMA 16x16x16, fp16/bf16 in, float32 accumulate):
// 64 query rows x the keys of one KV head, streamed 64 keys at a time through shared memory with an
// online softmax. The rows of a tile are whatever the caller's Problem maps them to:
//   prefill:  (token j, head of the GQA group) of one sequence, causal limit per token;
//   cascade prefix: (reader row b, head of the group) of one shared prefix: the prefix's K/V tiles
//             are read once for all 64 rows, so its readers' matvecs become one matmul (Hydragen);
//   cascade suffix: the group's heads of one decode row over its own suffix blocks.
// Problem interface (device), for the work item `item` (the CTA's blockIdx, or its item in a fused grid):
//   bool setup(TileRows&, item)        fills the KV source and key range (key_begin; num_keys and
//                                      unmasked_end: the largest and least key limit of the used rows);
//                                      false: this item has no work
//   void setup_row(TileRows&, item, r) fills row r's q pointer (nullptr: unused) and key limit; called
//                                      for every r < kMaxTileRows, by all the threads at once
//   void write(item, row, o[D], lse)   stores a finished row (o normalised; o = 0, lse = -inf when no keys)
#pragma once

#include <mma.h>

#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels::cuda {

constexpr int kTileRows = 64;  // query rows per CTA (4 warps x 16) of the WMMA and 4-warp mma kernels
constexpr int kTileKeys = 64;  // keys per shared-memory step
constexpr int kTileThreads = 128;
constexpr int kMaxTileRows = 128;  // the 8-warp mma kernel's rows (BATCHLLM_ATTENTION_TILES=mma128)

/// The rows and KV source of one tile, filled by Problem::setup: its first `tile_rows` entries (the
/// Problem's tile_rows, which the launcher sets to the kernel's rows).
template <typename T>
struct TileRows {
  const T* q[kMaxTileRows];       // query vector of each row (nullptr: row unused)
  int key_limit[kMaxTileRows];    // row attends to keys [0, key_limit) of the source
  int key_begin;               // first key to stream (split-KV chunks start past 0)
  int num_keys;                // stream keys [key_begin, num_keys): max key_limit over used rows
  int unmasked_end;            // min key_limit over used rows: keys below it are masked for no row
  const int32_t* blocks;       // KV block list of the source
  int block_size;              // set by the kernel from the cache shape
  FastDivisor block_div;       // block_size, for the key loops' divisions (PagedKvHead)
  int kv_head;
};

/// Shared-memory layout of a tile; leading dims are padded to keep WMMA pointers 32-byte aligned
/// and to spread rows over banks. The probabilities P (16-bit) overwrite the front of their own
/// score row S (float) once the row is read: at d = 128 that keeps a CTA under 114 KB, so two CTAs
/// fit one Hopper SM.
template <typename T, int D>
struct TileSmem {
  static constexpr int kLdQkv = D + 8;          // 16-bit elements
  static constexpr int kLdS = kTileKeys + 4;    // floats
  static constexpr int kLdP = 2 * kLdS;         // 16-bit elements: row r of P starts where row r of S does
  static constexpr int kLdO = D + 4;            // floats
  T q[kTileRows * kLdQkv];
  T k[kTileKeys * kLdQkv];
  T v[kTileKeys * kLdQkv];
  float s[kTileRows * kLdS];                    // S, and P in place (see p_row)
  float o[kTileRows * kLdO];
  float row_max[kTileRows];   // running max of scaled scores, log2 domain
  float row_sum[kTileRows];   // running sum of exp2(score - max)
  float row_alpha[kTileRows]; // rescale factor of this step
  TileRows<T> rows;

  __device__ T* p_row(int r) { return reinterpret_cast<T*>(s + r * kLdS); }
};

/// Copies 64 keys (from `first_key`) of one KV head into shared memory, 16 bytes per thread access;
/// keys past num_keys are zero-filled so that 0-probability columns never multiply garbage.
/// K and V are loaded in one unrolled loop so that every thread has all its 16-byte loads in flight
/// before the first store to shared memory.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(T* k_dst, T* v_dst, const TensorView& k_cache,
                                             const TensorView& v_cache, const TileRows<T>& rows, int first_key) {
  constexpr int kVecPerKey = D * sizeof(T) / 16;
  constexpr int kVecPerThread = kTileKeys * kVecPerKey / kTileThreads;
  static_assert(kTileKeys * kVecPerKey % kTileThreads == 0, "tile loads must divide evenly");
  const char* k_base = static_cast<const char*>(k_cache.data);
  const char* v_base = static_cast<const char*>(v_cache.data);
  uint4 k_values[kVecPerThread], v_values[kVecPerThread];
#pragma unroll
  for (int i = 0; i < kVecPerThread; ++i) {
    const int idx = threadIdx.x + i * kTileThreads;
    const int key = idx / kVecPerKey, chunk = idx % kVecPerKey;
    const int pos = first_key + key;
    k_values[i] = make_uint4(0, 0, 0, 0);
    v_values[i] = make_uint4(0, 0, 0, 0);
    if (pos < rows.num_keys) {
      const int64_t k_elem = paged_kv_offset(k_cache, rows.blocks, rows.block_size, rows.kv_head, pos);
      const int64_t v_elem = paged_kv_offset(v_cache, rows.blocks, rows.block_size, rows.kv_head, pos);
      k_values[i] = reinterpret_cast<const uint4*>(k_base + k_elem * sizeof(T))[chunk];
      v_values[i] = reinterpret_cast<const uint4*>(v_base + v_elem * sizeof(T))[chunk];
    }
  }
#pragma unroll
  for (int i = 0; i < kVecPerThread; ++i) {
    const int idx = threadIdx.x + i * kTileThreads;
    const int key = idx / kVecPerKey, chunk = idx % kVecPerKey;
    reinterpret_cast<uint4*>(k_dst + key * TileSmem<T, D>::kLdQkv)[chunk] = k_values[i];
    reinterpret_cast<uint4*>(v_dst + key * TileSmem<T, D>::kLdQkv)[chunk] = v_values[i];
  }
}

/// Thread 0 asks the Problem for the KV source of work item `item`, then every thread fills rows
/// (threadIdx.x, + blockDim.x, ...): a row's q pointer and limit cost a division by the GQA group and
/// a few loads, ~40 instructions, which one thread doing all 128 rows of a tile would spend serially
/// (~4 us, as long as a key tile step). False, for every thread, when the item has no work.
template <typename T, typename Problem>
__device__ __forceinline__ bool setup_rows(const Problem& problem, TileRows<T>& rows, const TensorView& k_cache,
                                           const dim3& item) {
  allow_dependents_to_launch();  // PDL: cuda_common.cuh
  if (threadIdx.x == 0) {
    rows.key_begin = 0;
    if (problem.setup(rows, item)) {
      rows.block_size = static_cast<int>(k_cache.shape[1]);
      rows.block_div = FastDivisor::make(static_cast<uint32_t>(rows.block_size));
    } else {
      rows.num_keys = -1;
    }
  }
  __syncthreads();
  const bool has_work = rows.num_keys >= 0;
  if (has_work) {
    for (int r = threadIdx.x; r < kMaxTileRows; r += blockDim.x) problem.setup_row(rows, item, r);
  }
  // Up to here only the step's metadata (the host's upload) was read; q and this step's K/V, which
  // earlier kernels of the step wrote, are read after this, in every CTA (PDL: cuda_common.cuh).
  wait_for_prerequisite_grids();
  if (!has_work) return false;
  __syncthreads();
  return true;
}

/// One work item of the tile kernel on a CTA of kTileThreads threads, in `smem_raw` (TileSmem, 128-byte
/// aligned): the body of attention_tile_kernel and of the fused cascade kernel's prefix items.
template <typename T, int D, typename Problem>
__device__ __forceinline__ void attention_tile(const Problem& problem, const dim3& item, unsigned char* smem_raw,
                                               const TensorView& k_cache, const TensorView& v_cache,
                                               float scale_log2) {
  using namespace nvcuda;
  using Smem = TileSmem<T, D>;
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  if (!setup_rows(problem, sm.rows, k_cache, item)) return;

  // Q rows (zero for unused rows), running state, O accumulator.
  constexpr int kVecPerRow = D * sizeof(T) / 16;
  for (int idx = threadIdx.x; idx < kTileRows * kVecPerRow; idx += kTileThreads) {
    const int row = idx / kVecPerRow, chunk = idx % kVecPerRow;
    const T* src = sm.rows.q[row];
    reinterpret_cast<uint4*>(sm.q + row * Smem::kLdQkv)[chunk] =
        src ? reinterpret_cast<const uint4*>(src)[chunk] : make_uint4(0, 0, 0, 0);
  }
  for (int idx = threadIdx.x; idx < kTileRows * Smem::kLdO; idx += kTileThreads) sm.o[idx] = 0.0f;
  if (threadIdx.x < kTileRows) {
    sm.row_max[threadIdx.x] = -INFINITY;
    sm.row_sum[threadIdx.x] = 0.0f;
  }

  const int warp_row0 = warp * 16;
  __syncthreads();  // Q rows visible to every warp
  // The warp's 16 query rows stay in registers for the whole key loop (D / 16 fragments).
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frags[D / 16];
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    wmma::load_matrix_sync(q_frags[i], sm.q + warp_row0 * Smem::kLdQkv + i * 16, Smem::kLdQkv);
  }

  for (int first_key = sm.rows.key_begin; first_key < sm.rows.num_keys; first_key += kTileKeys) {
    __syncthreads();  // previous step's readers of k/v (and of P inside S) are done
    load_kv_tile<T, D>(sm.k, sm.v, k_cache, v_cache, sm.rows, first_key);
    __syncthreads();

    // S[16 rows of this warp, 64 keys] = Q K^T.
#pragma unroll
    for (int n = 0; n < kTileKeys; n += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
      for (int i = 0; i < D / 16; ++i) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, sm.k + n * Smem::kLdQkv + i * 16, Smem::kLdQkv);
        wmma::mma_sync(s_frag, q_frags[i], k_frag, s_frag);
      }
      wmma::store_matrix_sync(sm.s + warp_row0 * Smem::kLdS + n, s_frag, Smem::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of the warp's 16 rows: each lane holds columns lane and lane + 32.
    for (int r = warp_row0; r < warp_row0 + 16; ++r) {
      const int limit = sm.rows.q[r] ? sm.rows.key_limit[r] : 0;
      float s0 = sm.s[r * Smem::kLdS + lane] * scale_log2;
      float s1 = sm.s[r * Smem::kLdS + lane + 32] * scale_log2;
      if (first_key + lane >= limit) s0 = -INFINITY;
      if (first_key + lane + 32 >= limit) s1 = -INFINITY;
      float tile_max = fmaxf(s0, s1);
      for (int offset = 16; offset > 0; offset /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      const float old_max = sm.row_max[r];
      const float new_max = fmaxf(old_max, tile_max);
      // No valid key yet for this row: keep everything at zero (exp2 of -inf - -inf would be NaN).
      const bool empty = new_max == -INFINITY;
      const float p0 = empty ? 0.0f : exp2f(s0 - new_max);
      const float p1 = empty ? 0.0f : exp2f(s1 - new_max);
      float tile_sum = p0 + p1;
      for (int offset = 16; offset > 0; offset /= 2) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
      const float alpha = empty ? 1.0f : exp2f(old_max - new_max);  // old_max -inf -> 0
      __syncwarp();  // every lane has read its scores of row r before P overwrites that row
      sm.p_row(r)[lane] = from_float<T>(p0);
      sm.p_row(r)[lane + 32] = from_float<T>(p1);
      __syncwarp();
      if (lane == 0) {
        sm.row_max[r] = new_max;
        sm.row_sum[r] = sm.row_sum[r] * alpha + tile_sum;
        sm.row_alpha[r] = alpha;
      }
    }
    __syncwarp();
    // Rescale the warp's O rows, then O += P V on tensor cores (accumulators loaded from smem).
    for (int idx = lane; idx < 16 * D; idx += 32) {
      const int r = warp_row0 + idx / D;
      sm.o[r * Smem::kLdO + idx % D] *= sm.row_alpha[r];
    }
    __syncwarp();
    for (int n = 0; n < D; n += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      float* o_tile = sm.o + warp_row0 * Smem::kLdO + n;
      wmma::load_matrix_sync(o_frag, o_tile, Smem::kLdO, wmma::mem_row_major);
      for (int kk = 0; kk < kTileKeys; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, sm.p_row(warp_row0) + kk, Smem::kLdP);
        wmma::load_matrix_sync(v_frag, sm.v + kk * Smem::kLdQkv + n, Smem::kLdQkv);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(o_tile, o_frag, Smem::kLdO, wmma::mem_row_major);
    }
  }
  __syncthreads();

  // Finish: each warp writes its rows (lanes across the head dim).
  for (int r = warp_row0; r < warp_row0 + 16; ++r) {
    if (!sm.rows.q[r]) continue;
    const float sum = sm.row_sum[r];
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    // lse back to natural log: (max + log2(sum)) * ln 2; -inf when the row saw no keys.
    const float lse = sum > 0.0f ? (sm.row_max[r] + log2f(sum)) * 0.69314718055994531f : -INFINITY;
    problem.write(item, r, sm.o + r * Smem::kLdO, inv, lse, lane);
  }
}

/// The tile kernel. grid: the Problem's work items; block: kTileThreads; dynamic smem: TileSmem.
template <typename T, int D, typename Problem>
__global__ void __launch_bounds__(kTileThreads) attention_tile_kernel(Problem problem, TensorView k_cache,
                                                                      TensorView v_cache, float scale_log2) {
  BATCHLLM_DYNAMIC_SHARED_MEMORY(smem_raw);
  attention_tile<T, D>(problem, blockIdx, smem_raw, k_cache, v_cache, scale_log2);
}

/// Launches a tile kernel (attention_tile_kernel, attention_mma_kernel) of kThreads threads with
/// kSmemBytes of dynamic shared memory; raises the kernel's limit above 48 KB once per process.
template <auto kKernel, size_t kSmemBytes, typename Problem, int kThreads = kTileThreads>
cudaError_t launch_tile_kernel(const Problem& problem, dim3 grid, const TensorView& k_cache,
                               const TensorView& v_cache, float scale, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  static const cudaError_t attribute_error =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  BATCHLLM_CUDA_RETURN_IF_ERROR(attribute_error);
  constexpr float kLog2e = 1.4426950408889634f;
  BATCHLLM_LAUNCH(grid, kThreads, kSmemBytes, stream, kKernel)(problem, k_cache, v_cache, scale * kLog2e);
  return last_launch_error();
}

/// CTAs of a tile kernel (kThreads threads, kSmemBytes of dynamic shared memory) that fit one SM by
/// the occupancy calculator (registers, shared memory, threads): what a split plan counts as a wave.
/// At least 1. Queried once a process (under the CPU emulation, at every call: tests vary it).
template <auto kKernel, size_t kSmemBytes, int kThreads = kTileThreads>
int tile_kernel_ctas_per_sm() {
  const auto query = [] {
    int ctas = 0;
    if (cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kKernel, kThreads, kSmemBytes) != cudaSuccess) {
      cudaGetLastError();  // not a launch error: the plan falls back to one CTA an SM
      ctas = 1;
    }
    return ctas < 1 ? 1 : ctas;
  };
#ifdef BATCHLLM_CUDA_EMULATION_ACTIVE
  return query();
#else
  static const int ctas = query();
  return ctas;
#endif
}

template <typename T, int D, typename Problem>
cudaError_t launch_attention_tiles(const Problem& problem, dim3 grid, const TensorView& k_cache,
                                   const TensorView& v_cache, float scale, cudaStream_t stream) {
  return launch_tile_kernel<attention_tile_kernel<T, D, Problem>, sizeof(TileSmem<T, D>)>(problem, grid, k_cache,
                                                                                          v_cache, scale, stream);
}

}  // namespace batchllm::kernels::cuda
