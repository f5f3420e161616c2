// CUDA sample_rows: one CTA per row reads the row's logits once (16-byte loads where the row allows),
// keeping per thread an online logsumexp and the best draw of batchllm/kernels/sampling.h; the
// threads' states are merged by shuffles, then across warps in shared memory. A filtered row
// (DrawFilters) then tries candidates as the CPU reference does: a pass a candidate, which ranks
// it, sums the mass before it and finds the best draw before it, until the filters keep one (no
// host sync, no sort: the sampler's torch way sorted, and synced to find the rows past 1,024
// candidates).
#include "batchllm/kernels/cuda.h"
#include "batchllm/kernels/sampling.h"
#include "kernels/cuda/cuda_common.cuh"

namespace batchllm::kernels {

namespace cuda {
namespace {

constexpr int kSampleThreads = 256;

__device__ __forceinline__ OnlineLse shuffled(const OnlineLse& a, int offset) {
  OnlineLse o;
  o.max = __shfl_xor_sync(0xffffffffu, a.max, offset);
  o.sum = __shfl_xor_sync(0xffffffffu, a.sum, offset);
  return o;
}

__device__ __forceinline__ BestDraw shuffled(const BestDraw& a, int offset) {
  BestDraw o;
  o.score = __shfl_xor_sync(0xffffffffu, a.score, offset);
  o.logit = __shfl_xor_sync(0xffffffffu, a.logit, offset);
  o.token = __shfl_xor_sync(0xffffffffu, a.token, offset);
  return o;
}

/// A thread's (then a warp's, then the row's) part of the pass.
struct DrawState {
  OnlineLse lse;
  BestDraw best;

  __device__ __forceinline__ void add(float x, float temperature, uint32_t key, uint32_t token) {
    lse.add(x);
    best.draw(x, temperature, key, token);
  }
  __device__ __forceinline__ void merge(const DrawState& o) {
    lse.merge(o.lse.max, o.lse.sum);
    best.merge(o.best);
  }
  __device__ __forceinline__ DrawState shuffled(int offset) const { return {cuda::shuffled(lse, offset), cuda::shuffled(best, offset)}; }
};

/// One try of a filtered row's candidate c: over the tokens before it, their count, their mass and
/// the best draw among them (the next candidate).
struct TryState {
  uint32_t rank = 0;
  float mass = 0.0f;
  BestDraw best;

  __device__ __forceinline__ void add(float x, float s, float s_max, float temperature, uint32_t key, uint32_t token) {
    ++rank;
    mass += expf(s - s_max);
    best.draw(x, temperature, key, token);
  }
  __device__ __forceinline__ void merge(const TryState& o) {
    rank += o.rank;
    mass += o.mass;
    best.merge(o.best);
  }
  __device__ __forceinline__ TryState shuffled(int offset) const {
    return {__shfl_xor_sync(0xffffffffu, rank, offset), __shfl_xor_sync(0xffffffffu, mass, offset),
            cuda::shuffled(best, offset)};
  }
};

/// Calls f(value, token) for each of the row's `vocab` logits this thread reads, as float.
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* logits, int64_t vocab, F&& f) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  if (vocab % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0) {
    for (int64_t v = static_cast<int64_t>(threadIdx.x) * kVec; v < vocab; v += kSampleThreads * kVec) {
      union {
        uint4 raw;
        T values[kVec];
      } chunk;
      chunk.raw = *reinterpret_cast<const uint4*>(logits + v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) f(to_float(chunk.values[i]), static_cast<uint32_t>(v + i));
    }
  } else {
    for (int64_t v = threadIdx.x; v < vocab; v += kSampleThreads) f(to_float(logits[v]), static_cast<uint32_t>(v));
  }
}

/// The mass (sum of exp(s - s_max)) of a row's first `top_k` tokens in its order (the CPU
/// reference's top_k_mass), or `mass` where top_k cuts nothing: the threshold, the k-th smallest
/// order_key, by a radix select (four passes, a byte each, a 256-bin histogram in shared memory),
/// then a pass for the mass. Every thread of the CTA calls it and gets the result.
template <typename T>
__device__ float top_k_mass(const T* logits, int64_t vocab, float temperature, int64_t top_k, float s_max,
                            float mass) {
  __shared__ int histogram[256];
  __shared__ uint32_t shared_prefix, shared_remaining;
  __shared__ bool cuts;
  __shared__ float warp_sums[kSampleThreads / 32];
  uint32_t prefix = 0, remaining = static_cast<uint32_t>(top_k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kSampleThreads) histogram[i] = 0;
    __syncthreads();
    const uint32_t high = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8);  // the bytes chosen so far
    for_each_logit(logits, vocab, [&](float x, uint32_t) {
      const float s = x / temperature;
      if (s != s) return;  // NaN: not in the order
      const uint32_t key = order_key(s);
      if ((key & high) == prefix) atomicAdd(&histogram[(key >> shift) & 0xFFu], 1);
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t below = 0;
      int bin = 0;
      while (bin < 256 && below + static_cast<uint32_t>(histogram[bin]) < remaining) below += histogram[bin++];
      cuts = bin < 256;  // fewer ordered tokens than top_k (NaNs): no cut
      shared_prefix = prefix | (static_cast<uint32_t>(bin & 0xFF) << shift);
      shared_remaining = remaining - below;
    }
    __syncthreads();
    if (!cuts) return mass;
    prefix = shared_prefix;
    remaining = shared_remaining;
  }
  // `prefix` is the threshold key; `remaining` of the tokens tied at it are among the first top_k.
  float kept = 0.0f;
  for_each_logit(logits, vocab, [&](float x, uint32_t) {
    const float s = x / temperature;
    if (s == s && order_key(s) < prefix) kept += expf(s - s_max);
  });
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) kept += __shfl_xor_sync(0xffffffffu, kept, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = kept;
  __syncthreads();
  kept = 0.0f;
  for (int w = 0; w < kSampleThreads / 32; ++w) kept += warp_sums[w];
  __syncthreads();  // warp_sums may be written again by a later call
  return kept + static_cast<float>(remaining) * expf(order_key_value(prefix) - s_max);
}

/// A filtered row's draw (thread 0's `state` holds the unfiltered best on entry and the kept one on
/// return): while the filters drop the candidate, the best draw before it is the next (the kept
/// tokens are a prefix of the row's order). Every thread of the CTA calls it.
template <typename T>
__device__ void filtered_draw(const T* logits, int64_t vocab, float temperature, uint32_t key,
                              const DrawFilters& filters, float s_max, float mass, DrawState& state) {
  __shared__ TryState warp_tries[kSampleThreads / 32];
  __shared__ float candidate_logit;
  __shared__ uint32_t candidate;
  if (threadIdx.x == 0) {
    candidate = state.best.token;
    candidate_logit = state.best.logit;
  }
  __syncthreads();
  while (candidate != kNoToken) {
    const uint32_t c = candidate;
    const float s_c = candidate_logit / temperature;
    TryState t;
    for_each_logit(logits, vocab, [&](float x, uint32_t token) {
      const float s = x / temperature;
      if (draw_before(s, token, s_c, c)) t.add(x, s, s_max, temperature, key, token);
    });
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) t.merge(t.shuffled(offset));
    if (threadIdx.x % 32 == 0) warp_tries[threadIdx.x / 32] = t;
    __syncthreads();  // the partial tries are in; everyone has read `candidate`
    if (threadIdx.x == 0) {
      for (int w = 1; w < kSampleThreads / 32; ++w) t.merge(warp_tries[w]);
      if (filters.keeps(t.rank, t.mass, mass, s_c - s_max)) {
        candidate = kNoToken;  // kept: state already holds it
      } else {
        state.best = t.best;
        candidate = t.best.token;
        candidate_logit = t.best.logit;
      }
    }
    __syncthreads();  // the decision is out; warp_tries may be written again
  }
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads) sample_rows_kernel(SampleRowsParams p) {
  begin_dependent_kernel();  // PDL: cuda_common.cuh
  __shared__ DrawState warp_states[kSampleThreads / 32];
  __shared__ float warp_masses[2][kSampleThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t vocab = p.logits.shape[1];
  const T* logits = static_cast<const T*>(p.logits.data) + row * p.logits.stride[0];
  const float temperature = p.temperature[row];
  const uint32_t key = static_cast<uint32_t>(p.keys[row]);
  DrawFilters filters;
  if (p.top_k != nullptr && temperature > 0.0f) filters = {p.top_k[row], p.top_p[row], p.min_p[row]};
  const bool filtered = filters.any();  // the same in every thread of the CTA
  DrawState state;
  OnlineLse tempered;  // a filtered row's tempered logits: the mass its top_p and min_p weigh
  if (filtered) {
    for_each_logit(logits, vocab, [&](float x, uint32_t token) {
      state.add(x, temperature, key, token);
      tempered.add(x / temperature);
    });
  } else {
    for_each_logit(logits, vocab, [&](float x, uint32_t token) { state.add(x, temperature, key, token); });
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) state.merge(state.shuffled(offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = state;
  if (filtered) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const OnlineLse other = shuffled(tempered, offset);
      tempered.merge(other.max, other.sum);
    }
    if (lane == 0) {
      warp_masses[0][warp] = tempered.max;
      warp_masses[1][warp] = tempered.sum;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kSampleThreads / 32; ++w) state.merge(warp_states[w]);
    for (int w = 1; filtered && w < kSampleThreads / 32; ++w) tempered.merge(warp_masses[0][w], warp_masses[1][w]);
  }
  if (filtered) {
    __shared__ float row_mass[2];
    if (threadIdx.x == 0) {
      row_mass[0] = tempered.max;
      row_mass[1] = tempered.sum;
    }
    __syncthreads();
    // top_p weighs the mass of what top_k keeps.
    const float kept = filters.top_p < 1.0f && filters.top_k > 0 && filters.top_k < vocab
                           ? top_k_mass(logits, vocab, temperature, filters.top_k, row_mass[0], row_mass[1])
                           : row_mass[1];
    filtered_draw(logits, vocab, temperature, key, filters, row_mass[0], kept, state);
  }
  if (threadIdx.x == 0) {
    const float lse = state.lse.value();
    p.token_ids[row] = state.best.token == kNoToken ? 0 : state.best.token;  // an all-NaN row: token 0
    p.lse[row] = lse;
    p.logprobs[row] = state.best.logit - lse;
  }
}

}  // namespace
}  // namespace cuda

cudaError_t sample_rows_cuda(const SampleRowsParams& p, cudaStream_t stream) {
  const int64_t rows = p.logits.shape[0];
  if (rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(rows);
  switch (p.logits.dtype) {
    case DType::kFloat32:
      BATCHLLM_LAUNCH(grid, cuda::kSampleThreads, 0, stream, cuda::sample_rows_kernel<float>)(p);
      break;
    case DType::kFloat16:
      BATCHLLM_LAUNCH(grid, cuda::kSampleThreads, 0, stream, cuda::sample_rows_kernel<__half>)(p);
      break;
    case DType::kBFloat16:
      BATCHLLM_LAUNCH(grid, cuda::kSampleThreads, 0, stream, cuda::sample_rows_kernel<__nv_bfloat16>)(p);
      break;
  }
  return cuda::last_launch_error();
}

}  // namespace batchllm::kernels
