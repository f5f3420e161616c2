// The choice of tile kernel for prefill and cascade-prefix tiles, and its launcher: WMMA
// (attention_tile.cuh), mma.sync (attention_mma.cuh) or wgmma (attention_wgmma.cuh).
#pragma once

#include "kernels/cuda/attention_wgmma.cuh"

namespace batchllm::kernels::cuda {

/// Where tiles run: a prefill chunk's (query rows of one sequence over its paged context) or a
/// cascade prefix's (the query rows of every reader of one prefix). Their defaults differ.
enum class TileUse { kPrefill, kPrefix };

/// The kernel of prefill and cascade-prefix tiles, from BATCHLLM_ATTENTION_TILES, read at every
/// launch so that a benchmark can compare them in one process: wmma (64 rows on WMMA fragments),
/// mma (the mma.sync kernel, 4 warps, 64 rows), mma128 (8 warps, 128 rows: each K/V tile brought
/// into shared memory serves twice the rows, which halves the L2 -> SM traffic of a prefix with many
/// readers), wgmma (mma128's tile on Hopper's warpgroup MMA), wgmma-pipe (the same with one key
/// tile's products overlapping the next one's softmax) or wgmma64 (wgmma-pipe on one warpgroup: 64
/// rows, several CTAs an SM where registers and shared memory allow: at d = 64, 3 against one
/// 128-row CTA, so more warps hide the key loop's latency, at twice the L2 -> SM traffic per row) or
/// wgmma-k128 (wgmma-pipe on 128-key tiles: attention_wgmma.cuh);
/// where wgmma_available() is false, mma128 runs instead of wgmma, wgmma-pipe and wgmma-k128, mma of
/// wgmma64.
///
/// Unset, the default is what the H100 runs of 2026-11-27 measured fastest (docs/BENCHMARKS.md,
/// runs 4 and 5), by head dim:
/// - d = 128: prefill mma128, cascade prefixes mma. Causal 4,096-token chunks: 1 chunk 0.585 ms on
///   mma128 against 0.685 on wgmma-pipe (SDPA flash 0.493), 4 chunks 2.26 against 2.64 ms; the decode
///   grid's geometric mean of time on wgmma-pipe over mma's 1.045, and the prefix tiles alone faster
///   on mma at all four d = 128 shapes of the prefix scan (run 5).
/// - d = 64 (llama-1b): wgmma-pipe for both where wgmma runs, else mma. Run 5 tried mma128 / mma at
///   d = 64 too, end to end: W5 1/8 (prefill-bound) took 1.289 s on them against 0.967 s on
///   wgmma-pipe, W1 1/4 0.626 against 0.606 s (each its process's first run); the prefix scan at
///   d = 64 had the two within 10% either way.
enum class TileKernel { kWmma, kMma, kMma128, kWgmma, kWgmmaPipelined, kWgmma64, kWgmmaWide };

inline TileKernel tile_kernel(TileUse use, int64_t head_dim) {
  if (env_equals("BATCHLLM_ATTENTION_TILES", "wmma")) return TileKernel::kWmma;
  if (env_equals("BATCHLLM_ATTENTION_TILES", "mma")) return TileKernel::kMma;
  if (env_equals("BATCHLLM_ATTENTION_TILES", "mma128")) return TileKernel::kMma128;
  if (env_equals("BATCHLLM_ATTENTION_TILES", "wgmma")) {
    return wgmma_available() ? TileKernel::kWgmma : TileKernel::kMma128;
  }
  if (env_equals("BATCHLLM_ATTENTION_TILES", "wgmma-pipe")) {
    return wgmma_available() ? TileKernel::kWgmmaPipelined : TileKernel::kMma128;
  }
  if (env_equals("BATCHLLM_ATTENTION_TILES", "wgmma64")) {
    return wgmma_available() ? TileKernel::kWgmma64 : TileKernel::kMma;
  }
  if (env_equals("BATCHLLM_ATTENTION_TILES", "wgmma-k128")) {
    return wgmma_available() ? TileKernel::kWgmmaWide : TileKernel::kMma128;
  }
  if (head_dim <= 64) return wgmma_available() ? TileKernel::kWgmmaPipelined : TileKernel::kMma;
  return use == TileUse::kPrefill ? TileKernel::kMma128 : TileKernel::kMma;
}

/// Query rows per tile of a tile kernel: the Problem's tile_rows and the grid follow it.
inline int tile_rows(TileKernel kernel) {
  return kernel == TileKernel::kWmma || kernel == TileKernel::kMma || kernel == TileKernel::kWgmma64 ? kTileRows
                                                                                                   : kMaxTileRows;
}

/// Keys per shared-memory step of a tile kernel: the prefix split rounds its key chunks to it (a
/// chunk ending inside a step pays the whole step).
inline int tile_keys(TileKernel kernel) { return kernel == TileKernel::kWgmmaWide ? 2 * kTileKeys : kTileKeys; }

/// Launches the Problem's tiles on `kernel` (tile_kernel(use, D)); the Problem's tile_rows and the grid
/// must be tile_rows(kernel)'s.
template <typename T, int D, typename Problem>
cudaError_t launch_tiles(TileKernel kernel, const Problem& problem, dim3 grid, const TensorView& k_cache,
                         const TensorView& v_cache, float scale, cudaStream_t stream) {
  if (problem.tile_rows != tile_rows(kernel)) return cudaErrorInvalidValue;
  switch (kernel) {
    case TileKernel::kMma:
      return launch_tile_kernel<attention_mma_kernel<T, D, Problem, 4>, sizeof(MmaSmem<T, D>)>(
          problem, grid, k_cache, v_cache, scale, stream);
    case TileKernel::kMma128:
      return launch_tile_kernel<attention_mma_kernel<T, D, Problem, 8>, sizeof(MmaSmem<T, D>), Problem, 256>(
          problem, grid, k_cache, v_cache, scale, stream);
    case TileKernel::kWgmma:
      return launch_tile_kernel<attention_wgmma_kernel<T, D, Problem, 8, false>, sizeof(WgmmaSmemFor<T, D, false>),
                                Problem, 256>(problem, grid, k_cache, v_cache, scale, stream);
    case TileKernel::kWgmmaPipelined:
      return launch_tile_kernel<attention_wgmma_kernel<T, D, Problem, 8, true>, sizeof(WgmmaSmemFor<T, D, true>),
                                Problem, 256>(problem, grid, k_cache, v_cache, scale, stream);
    case TileKernel::kWgmma64:
      return launch_tile_kernel<attention_wgmma_kernel<T, D, Problem, 4, true>, sizeof(WgmmaSmemFor<T, D, true>)>(
          problem, grid, k_cache, v_cache, scale, stream);
    case TileKernel::kWgmmaWide:
      return launch_tile_kernel<attention_wgmma_kernel<T, D, Problem, 8, true, 2 * kTileKeys>,
                                sizeof(WgmmaSmemFor<T, D, true, 2 * kTileKeys>), Problem, 256>(
          problem, grid, k_cache, v_cache, scale, stream);
    default:
      return launch_attention_tiles<T, D>(problem, grid, k_cache, v_cache, scale, stream);
  }
}

/// CTAs of `kernel`'s tiles (for the Problem) that fit one SM: tile_kernel_ctas_per_sm of the kernel
/// launch_tiles launches.
template <typename T, int D, typename Problem>
int tile_ctas_per_sm(TileKernel kernel) {
  switch (kernel) {
    case TileKernel::kMma:
      return tile_kernel_ctas_per_sm<attention_mma_kernel<T, D, Problem, 4>, sizeof(MmaSmem<T, D>)>();
    case TileKernel::kMma128:
      return tile_kernel_ctas_per_sm<attention_mma_kernel<T, D, Problem, 8>, sizeof(MmaSmem<T, D>), 256>();
    case TileKernel::kWgmma:
      return tile_kernel_ctas_per_sm<attention_wgmma_kernel<T, D, Problem, 8, false>,
                                     sizeof(WgmmaSmemFor<T, D, false>), 256>();
    case TileKernel::kWgmmaPipelined:
      return tile_kernel_ctas_per_sm<attention_wgmma_kernel<T, D, Problem, 8, true>,
                                     sizeof(WgmmaSmemFor<T, D, true>), 256>();
    case TileKernel::kWgmma64:
      return tile_kernel_ctas_per_sm<attention_wgmma_kernel<T, D, Problem, 4, true>, sizeof(WgmmaSmemFor<T, D, true>)>();
    case TileKernel::kWgmmaWide:
      return tile_kernel_ctas_per_sm<attention_wgmma_kernel<T, D, Problem, 8, true, 2 * kTileKeys>,
                                     sizeof(WgmmaSmemFor<T, D, true, 2 * kTileKeys>), 256>();
    default:
      return tile_kernel_ctas_per_sm<attention_tile_kernel<T, D, Problem>, sizeof(TileSmem<T, D>)>();
  }
}

}  // namespace batchllm::kernels::cuda
