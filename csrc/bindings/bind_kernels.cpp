// Bindings of the attention kernels: validate every argument (kernel_args.h), then dispatch to the
// CPU reference or the CUDA launcher by the tensors' device. Called by batchllm_core.ops only.
#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <utility>

#include "batchllm/kernels.h"
#include "bindings/kernel_args.h"
#include "bindings/registry.h"
#ifdef BATCHLLM_WITH_CUDA
#include "batchllm/kernels/cuda.h"
#endif

namespace py = pybind11;
using batchllm::kernels::DType;
using batchllm::kernels::Status;
using batchllm::kernels::TensorView;

namespace batchllm::bindings {

namespace {

bool cuda_head_dim_ok(int64_t head_dim) {
#ifdef BATCHLLM_WITH_CUDA
  return kernels::cuda_head_dim_supported(head_dim);
#else
  return false;
#endif
}

/// Shapes shared by the attention kernels, checked once: q/o [N, Hq, D], caches [blocks, bs, Hkv, D].
struct CacheShape {
  int64_t num_blocks, block_size, num_kv_heads;
};

CacheShape check_attention_views(const ArgChecker& c, const ViewArg& q_arg, const TensorView& q,
                                 const TensorView& k_cache, const TensorView& v_cache, const TensorView& o,
                                 float scale) {
  // The kernels fold the scale into the exponent after taking the row max of the raw scores, which
  // is the max of the scaled scores only for a positive scale.
  c.require(scale > 0.0f && std::isfinite(scale), "scale", "must be positive and finite, got " + std::to_string(scale));
  for (int d = 0; d < 4; ++d) {
    c.require(v_cache.shape[d] == k_cache.shape[d], "v_cache", "must have k_cache's shape");
  }
  c.require(k_cache.dtype == q.dtype && v_cache.dtype == q.dtype, "k_cache",
            std::string("must have q's dtype ") + kernels::dtype_name(q.dtype));
  c.require(o.dtype == q.dtype, "o", std::string("must have q's dtype ") + kernels::dtype_name(q.dtype));
  for (int d = 0; d < 3; ++d) c.require(o.shape[d] == q.shape[d], "o", "must have q's shape");
  c.require(q.shape[2] == k_cache.shape[3], "k_cache",
            "head dim " + std::to_string(k_cache.shape[3]) + " differs from q's " + std::to_string(q.shape[2]));
  c.require(q.shape[2] > 0, "q", "must have a head dim > 0");
  c.require(k_cache.shape[1] > 0, "k_cache", "must have a block size > 0");
  c.require(k_cache.shape[2] > 0 && q.shape[1] % k_cache.shape[2] == 0, "k_cache",
            "KV heads (" + std::to_string(k_cache.shape[2]) + ") must divide q heads (" + std::to_string(q.shape[1]) + ")");
  if (q_arg.is_cuda()) {
    c.require(q.dtype != DType::kFloat32, "q", "must be float16 or bfloat16 on CUDA");
    c.rows_aligned_16(q_arg, q);
    c.rows_aligned_16(ViewArg{"k_cache", reinterpret_cast<uintptr_t>(k_cache.data)}, k_cache);
    c.rows_aligned_16(ViewArg{"v_cache", reinterpret_cast<uintptr_t>(v_cache.data)}, v_cache);
    c.require(cuda_head_dim_ok(q.shape[2]), "q",
              "head dim " + std::to_string(q.shape[2]) + " is not built for CUDA (built: 64, 128)");
    // The key loops address a block and a slot with 32-bit byte strides (PagedKvHead).
    for (const auto& [name, cache] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}}) {
      const int d = kernels::cache_stride_past_32_bits(*cache);
      c.require(d < 0, name, "stride " + std::to_string(cache->stride[d < 0 ? 0 : d]) + " of dim " + std::to_string(d) +
                                 " is too large for CUDA (a block's or a slot's bytes must fit 32 bits)");
    }
  }
  return {k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]};
}

/// Checks that the first ceil(num_tokens / block_size) entries of a block list are valid blocks.
void check_block_list(const ArgChecker& c, const std::string& name, const int32_t* blocks, int64_t available,
                      int64_t num_tokens, const CacheShape& cache) {
  const int64_t needed = (num_tokens + cache.block_size - 1) / cache.block_size;
  c.require(needed <= available, name,
            "holds " + std::to_string(available) + " blocks but " + std::to_string(num_tokens) + " tokens need " +
                std::to_string(needed));
  for (int64_t i = 0; i < needed; ++i) {
    c.require(blocks[i] >= 0 && blocks[i] < cache.num_blocks, name,
              "entry " + std::to_string(i) + " = " + std::to_string(blocks[i]) + " is out of range [0, " +
                  std::to_string(cache.num_blocks) + ")");
  }
}

/// Runs a CPU reference (without the GIL) or raises if it reports a problem validation missed.
template <typename Fn>
void run_cpu(const ArgChecker& c, Fn&& fn) {
  Status status;
  {
    py::gil_scoped_release release;
    status = fn();
  }
  if (status != Status::kOk) {
    throw std::runtime_error(std::string(c.kernel()) + ": CPU kernel rejected its arguments (status " +
                             std::to_string(static_cast<int>(status)) + ")");
  }
}

#ifdef BATCHLLM_WITH_CUDA
/// Makes `device` current for its lifetime, then restores the caller's device.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
    device_ = device;
  }
  ~CudaDeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int device_ = 0;
};

/// Launches on `device` and turns an error into RuntimeError naming the kernel.
template <typename Fn>
void run_cuda(const ArgChecker& c, int device, Fn&& fn) {
  cudaError_t err;
  {
    const CudaDeviceGuard guard(device);
    err = fn();
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(c.kernel()) + ": CUDA error: " + cudaGetErrorString(err));
  }
}
#define BATCHLLM_DISPATCH(checker, device, cpu_call, cuda_call) \
  ((device) >= 0 ? run_cuda(checker, device, [&] { return cuda_call; }) : run_cpu(checker, [&] { return cpu_call; }))
#else
#define BATCHLLM_DISPATCH(checker, device, cpu_call, cuda_call)                                    \
  ((device) >= 0 ? checker.fail("q", "is on a CUDA device but this build has no CUDA support") \
                 : run_cpu(checker, [&] { return cpu_call; }))
#endif

/// The store of store_kv and of rotary_embedding's fused store: v, the caches and the slots, checked
/// against k (shapes, dtypes, devices, 16-byte rows on CUDA, and the slots within the cache where
/// they are readable: on the CPU, or with check_indices).
kernels::StoreKvParams check_store_args(const ArgChecker& c, const ViewArg& k_arg, const kernels::TensorView& k,
                                        py::handle v_obj, py::handle k_cache_obj, py::handle v_cache_obj,
                                        py::handle slot_obj, bool check_indices) {
  const ViewArg v_arg = c.parse(v_obj, "v");
  const ViewArg kc_arg = c.parse(k_cache_obj, "k_cache"), vc_arg = c.parse(v_cache_obj, "v_cache");
  const ViewArg slot_arg = c.parse(slot_obj, "slot_mapping");
  c.same_device({&k_arg, &v_arg, &kc_arg, &vc_arg, &slot_arg});
  kernels::StoreKvParams p;
  p.k = k;
  p.v = c.tensor(v_arg, 3);
  p.k_cache = c.tensor(kc_arg, 4);
  p.v_cache = c.tensor(vc_arg, 4);
  for (int d = 0; d < 3; ++d) c.require(p.v.shape[d] == p.k.shape[d], "v", "must have k's shape");
  for (int d = 0; d < 4; ++d) c.require(p.v_cache.shape[d] == p.k_cache.shape[d], "v_cache", "must have k_cache's shape");
  c.require(p.k.shape[1] == p.k_cache.shape[2] && p.k.shape[2] == p.k_cache.shape[3], "k_cache",
            "must have k's KV heads and head dim in dims 2 and 3");
  c.require(p.k_cache.dtype == p.k.dtype && p.v_cache.dtype == p.k.dtype && p.v.dtype == p.k.dtype, "k_cache",
            "k, v, k_cache and v_cache must share one dtype");
  if (k_arg.is_cuda()) {
    c.require(p.k.dtype != DType::kFloat32, "k", "must be float16 or bfloat16 on CUDA");
    c.rows_aligned_16(k_arg, p.k);
    c.rows_aligned_16(v_arg, p.v);
    c.rows_aligned_16(kc_arg, p.k_cache);
    c.rows_aligned_16(vc_arg, p.v_cache);
  }
  c.index_array(slot_arg, "int64", {p.k.shape[0]});
  p.slot_mapping = reinterpret_cast<const int64_t*>(slot_arg.data);
  if (check_indices || !slot_arg.is_cuda()) {
    const int64_t num_slots = p.k_cache.shape[0] * p.k_cache.shape[1];
    const auto slots = c.read<int64_t>(slot_arg);
    for (size_t t = 0; t < slots.size(); ++t) {
      c.require(slots[t] < num_slots, "slot_mapping",
                "entry " + std::to_string(t) + " = " + std::to_string(slots[t]) + " is out of range (< " +
                    std::to_string(num_slots) + " slots)");
    }
  }
  return p;
}

void store_kv(py::handle k_obj, py::handle v_obj, py::handle k_cache_obj, py::handle v_cache_obj,
              py::handle slot_obj, uintptr_t stream, bool check_indices) {
  const ArgChecker c("store_kv");
  const ViewArg k_arg = c.parse(k_obj, "k");
  const kernels::StoreKvParams p =
      check_store_args(c, k_arg, c.tensor(k_arg, 3), v_obj, k_cache_obj, v_cache_obj, slot_obj, check_indices);
  BATCHLLM_DISPATCH(c, k_arg.device, kernels::store_kv_cpu(p),
                    kernels::store_kv_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

void prefill_attention(py::handle q_obj, py::handle k_cache_obj, py::handle v_cache_obj, py::handle tables_obj,
                       py::handle query_start_obj, py::handle context_lens_obj, py::handle o_obj, float scale,
                       int32_t max_q_len, uintptr_t stream, bool check_indices) {
  const ArgChecker c("prefill_attention");
  const ViewArg q_arg = c.parse(q_obj, "q"), kc_arg = c.parse(k_cache_obj, "k_cache");
  const ViewArg vc_arg = c.parse(v_cache_obj, "v_cache"), o_arg = c.parse(o_obj, "o");
  const ViewArg tables_arg = c.parse(tables_obj, "block_tables");
  const ViewArg qs_arg = c.parse(query_start_obj, "query_start");
  const ViewArg ctx_arg = c.parse(context_lens_obj, "context_lens");
  c.same_device({&q_arg, &kc_arg, &vc_arg, &o_arg, &tables_arg, &qs_arg, &ctx_arg});
  kernels::PrefillParams p;
  p.q = c.tensor(q_arg, 3);
  p.k_cache = c.tensor(kc_arg, 4);
  p.v_cache = c.tensor(vc_arg, 4);
  p.o = c.tensor(o_arg, 3);
  const CacheShape cache = check_attention_views(c, q_arg, p.q, p.k_cache, p.v_cache, p.o, scale);
  c.require(tables_arg.shape.size() == 2, "block_tables", "must have 2 dimensions [S, max_blocks]");
  const int64_t num_seqs = tables_arg.shape[0];
  c.index_array(tables_arg, "int32", {num_seqs, -1});
  c.index_array(qs_arg, "int32", {num_seqs + 1});
  c.index_array(ctx_arg, "int32", {num_seqs});
  p.num_seqs = num_seqs;
  p.max_blocks_per_seq = tables_arg.shape[1];
  p.block_tables = reinterpret_cast<const int32_t*>(tables_arg.data);
  p.query_start = reinterpret_cast<const int32_t*>(qs_arg.data);
  p.context_lens = reinterpret_cast<const int32_t*>(ctx_arg.data);
  p.scale = scale;
  p.max_q_len = max_q_len;
  // CUDA grids put sequences on grid.y (at most 65535); the runtime's steps stay far below.
  c.require(!q_arg.is_cuda() || num_seqs <= 65535, "block_tables", "has more than 65535 sequences (CUDA grid limit)");
  if (check_indices || !q_arg.is_cuda()) {
    const auto query_start = c.read<int32_t>(qs_arg);
    const auto context_lens = c.read<int32_t>(ctx_arg);
    const auto tables = c.read<int32_t>(tables_arg);
    c.require(num_seqs == 0 || (query_start[0] >= 0 && query_start[num_seqs] <= p.q.shape[0]), "query_start",
              "must stay within q's " + std::to_string(p.q.shape[0]) + " rows");
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t q_len = query_start[s + 1] - query_start[s];
      c.require(q_len >= 0, "query_start", "must be non-decreasing (sequence " + std::to_string(s) + ")");
      c.require(!q_arg.is_cuda() || q_len <= max_q_len, "max_q_len",
                "is " + std::to_string(max_q_len) + " but sequence " + std::to_string(s) + " has " +
                    std::to_string(q_len) + " query rows");
      c.require(context_lens[s] >= q_len, "context_lens",
                "entry " + std::to_string(s) + " = " + std::to_string(context_lens[s]) + " is smaller than its " +
                    std::to_string(q_len) + " query rows");
      check_block_list(c, "block_tables[" + std::to_string(s) + "]", tables.data() + s * p.max_blocks_per_seq,
                       p.max_blocks_per_seq, context_lens[s], cache);
    }
  }
  BATCHLLM_DISPATCH(c, q_arg.device, kernels::prefill_attention_cpu(p),
                    kernels::prefill_attention_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

/// Views of the DecodeLevels arrays, in the order batchllm_core.ops passes them.
struct LevelArgs {
  ViewArg kv_indptr, kv_blocks, kv_lens, q_range, suffix_tables, suffix_lens;
};

void check_levels(const ArgChecker& c, const LevelArgs& a, int64_t num_rows, const CacheShape& cache,
                  bool check_contents, bool check_hints, kernels::DecodeLevelsView& levels) {
  const int64_t num_prefixes = a.kv_lens.shape.size() == 1 ? a.kv_lens.shape[0] : -1;
  c.require(num_prefixes >= 0, "prefix_kv_lens", "must have 1 dimension [P]");
  c.index_array(a.kv_indptr, "int32", {num_prefixes + 1});
  c.index_array(a.kv_blocks, "int32", {-1});
  c.index_array(a.kv_lens, "int32", {num_prefixes});
  c.index_array(a.q_range, "int32", {num_prefixes, 2});
  c.require(a.suffix_tables.shape.size() == 2, "suffix_block_tables", "must have 2 dimensions [B, max_blocks]");
  c.index_array(a.suffix_tables, "int32", {num_rows, -1});
  c.index_array(a.suffix_lens, "int32", {num_rows});
  levels.num_prefixes = num_prefixes;
  levels.prefix_kv_indptr = reinterpret_cast<const int32_t*>(a.kv_indptr.data);
  levels.prefix_kv_blocks = reinterpret_cast<const int32_t*>(a.kv_blocks.data);
  levels.prefix_kv_lens = reinterpret_cast<const int32_t*>(a.kv_lens.data);
  levels.prefix_q_range = reinterpret_cast<const int32_t*>(a.q_range.data);
  levels.suffix_block_tables = reinterpret_cast<const int32_t*>(a.suffix_tables.data);
  levels.max_suffix_blocks = a.suffix_tables.shape[1];
  levels.suffix_kv_lens = reinterpret_cast<const int32_t*>(a.suffix_lens.data);
  if (!check_contents) return;
  const auto indptr = c.read<int32_t>(a.kv_indptr);
  const auto blocks = c.read<int32_t>(a.kv_blocks);
  const auto lens = c.read<int32_t>(a.kv_lens);
  const auto ranges = c.read<int32_t>(a.q_range);
  const auto suffix_tables = c.read<int32_t>(a.suffix_tables);
  const auto suffix_lens = c.read<int32_t>(a.suffix_lens);
  c.require(indptr[0] >= 0 && indptr[num_prefixes] <= static_cast<int64_t>(blocks.size()), "prefix_kv_indptr",
            "must index within prefix_kv_blocks");
  for (int64_t p = 0; p < num_prefixes; ++p) {
    const std::string at = "entry " + std::to_string(p);
    c.require(indptr[p + 1] >= indptr[p], "prefix_kv_indptr", "must be non-decreasing (" + at + ")");
    c.require(lens[p] >= 0, "prefix_kv_lens", at + " is negative");
    const int32_t begin = ranges[2 * p], end = ranges[2 * p + 1];
    c.require(0 <= begin && begin <= end && end <= num_rows, "prefix_q_range",
              at + " = [" + std::to_string(begin) + ", " + std::to_string(end) + ") is not within [0, " +
                  std::to_string(num_rows) + ")");
    check_block_list(c, "prefix_kv_blocks (prefix " + std::to_string(p) + ")", blocks.data() + indptr[p],
                     indptr[p + 1] - indptr[p], lens[p], cache);
    c.require(!check_hints || (lens[p] <= levels.max_prefix_kv_len && end - begin <= levels.max_prefix_rows),
              "levels", "hints max_prefix_kv_len/max_prefix_rows are below prefix " + std::to_string(p) + "'s sizes");
  }
  for (int64_t b = 0; b < num_rows; ++b) {
    c.require(suffix_lens[b] >= 0, "suffix_kv_lens", "entry " + std::to_string(b) + " is negative");
    c.require(!check_hints || suffix_lens[b] <= levels.max_suffix_kv_len, "levels",
              "hint max_suffix_kv_len is below row " + std::to_string(b) + "'s suffix length");
    check_block_list(c, "suffix_block_tables[" + std::to_string(b) + "]",
                     suffix_tables.data() + b * levels.max_suffix_blocks, levels.max_suffix_blocks, suffix_lens[b],
                     cache);
  }
}

/// The suffix split array (DecodeLevelsView::suffix_split): int32 [3] {splits, chunk_keys, rows}.
/// With its contents readable: at least one split of at least one key, the rows within the batch, and
/// every covered row's suffix within its splits' keys (a shorter split would drop keys silently).
void check_suffix_split(const ArgChecker& c, const ViewArg& arg, const LevelArgs& levels, int64_t num_rows,
                        bool check_contents) {
  c.index_array(arg, "int32", {3});
  if (!check_contents) return;
  const auto split = c.read<int32_t>(arg);
  const auto suffix_lens = c.read<int32_t>(levels.suffix_lens);
  c.require(split[0] >= 1 && split[1] >= 1, "suffix_split", "needs splits >= 1 and chunk_keys >= 1");
  c.require(0 <= split[2] && split[2] <= num_rows, "suffix_split",
            "rows " + std::to_string(split[2]) + " is not within [0, " + std::to_string(num_rows) + "]");
  for (int64_t b = 0; b < split[2]; ++b) {
    c.require(static_cast<int64_t>(split[0]) * split[1] >= suffix_lens[b], "suffix_split",
              "splits x chunk_keys is below row " + std::to_string(b) + "'s suffix length");
  }
  for (int64_t b = split[2]; b < num_rows; ++b) {
    c.require(suffix_lens[b] <= 1, "suffix_split",
              "leaves out row " + std::to_string(b) + ", which has more than one suffix key (only padded rows may)");
  }
}

/// The prefix split array (DecodeLevelsView::prefix_split): int32 [3] {splits, chunk_keys, state_rows}.
/// With its contents readable: at least one split of at least one key, state rows for every prefix's
/// readers, and every prefix's keys within its splits' (a shorter split would drop keys silently).
void check_prefix_split(const ArgChecker& c, const ViewArg& arg, const LevelArgs& levels, bool check_contents) {
  c.index_array(arg, "int32", {3});
  if (!check_contents) return;
  const auto split = c.read<int32_t>(arg);
  const auto lens = c.read<int32_t>(levels.kv_lens);
  const auto ranges = c.read<int32_t>(levels.q_range);
  c.require(split[0] >= 1 && split[1] >= 1 && split[2] >= 0, "prefix_split",
            "needs splits >= 1, chunk_keys >= 1 and state_rows >= 0");
  for (size_t p = 0; p < lens.size(); ++p) {
    c.require(static_cast<int64_t>(split[0]) * split[1] >= lens[p], "prefix_split",
              "splits x chunk_keys is below prefix " + std::to_string(p) + "'s length");
    c.require(ranges[2 * p + 1] - ranges[2 * p] <= split[2], "prefix_split",
              "state_rows is below prefix " + std::to_string(p) + "'s readers");
  }
}

void cascade_decode_attention(py::handle q_obj, py::handle k_cache_obj, py::handle v_cache_obj,
                              py::tuple level_objs, std::vector<int32_t> hints, py::handle o_obj,
                              py::object lse_obj, py::object workspace_obj, float scale, uintptr_t stream,
                              bool check_indices) {
  const ArgChecker c("cascade_decode_attention");
  const ViewArg q_arg = c.parse(q_obj, "q"), kc_arg = c.parse(k_cache_obj, "k_cache");
  const ViewArg vc_arg = c.parse(v_cache_obj, "v_cache"), o_arg = c.parse(o_obj, "o");
  c.require(level_objs.size() >= 6 && level_objs.size() <= 8, "levels",
            "must carry 6 arrays, then optionally the suffix split and the prefix split (each or None)");
  c.require(hints.size() == 3, "levels", "must carry 3 hints (max_prefix_kv_len, max_prefix_rows, max_suffix_kv_len)");
  const LevelArgs levels_arg{c.parse(level_objs[0], "prefix_kv_indptr"), c.parse(level_objs[1], "prefix_kv_blocks"),
                             c.parse(level_objs[2], "prefix_kv_lens"),   c.parse(level_objs[3], "prefix_q_range"),
                             c.parse(level_objs[4], "suffix_block_tables"), c.parse(level_objs[5], "suffix_kv_lens")};
  c.same_device({&q_arg, &kc_arg, &vc_arg, &o_arg, &levels_arg.kv_indptr, &levels_arg.kv_blocks, &levels_arg.kv_lens,
                 &levels_arg.q_range, &levels_arg.suffix_tables, &levels_arg.suffix_lens});
  kernels::CascadeDecodeParams p;
  p.q = c.tensor(q_arg, 3);
  p.k_cache = c.tensor(kc_arg, 4);
  p.v_cache = c.tensor(vc_arg, 4);
  p.o = c.tensor(o_arg, 3);
  p.scale = scale;
  const CacheShape cache = check_attention_views(c, q_arg, p.q, p.k_cache, p.v_cache, p.o, scale);
  p.levels.max_prefix_kv_len = hints[0];
  p.levels.max_prefix_rows = hints[1];
  p.levels.max_suffix_kv_len = hints[2];
  const bool check_contents = check_indices || !q_arg.is_cuda();
  check_levels(c, levels_arg, p.q.shape[0], cache, check_contents, q_arg.is_cuda(), p.levels);
  if (level_objs.size() >= 7 && !level_objs[6].is_none()) {
    const ViewArg split_arg = c.parse(level_objs[6], "suffix_split");
    c.same_device({&q_arg, &split_arg});
    check_suffix_split(c, split_arg, levels_arg, p.q.shape[0], check_contents);
    p.levels.suffix_split = reinterpret_cast<const int32_t*>(split_arg.data);
  }
  if (level_objs.size() == 8 && !level_objs[7].is_none()) {
    const ViewArg split_arg = c.parse(level_objs[7], "prefix_split");
    c.same_device({&q_arg, &split_arg});
    check_prefix_split(c, split_arg, levels_arg, check_contents);
    p.levels.prefix_split = reinterpret_cast<const int32_t*>(split_arg.data);
  }
  c.require(!q_arg.is_cuda() || (p.q.shape[0] <= 65535 && p.levels.num_prefixes <= 65535), "q",
            "has more than 65535 rows or prefixes (CUDA grid limit)");
  if (!lse_obj.is_none()) {
    const ViewArg lse_arg = c.parse(lse_obj, "lse");
    c.same_device({&q_arg, &lse_arg});
    c.index_array(lse_arg, "float32", {p.q.shape[0], p.q.shape[1]});
    p.lse = reinterpret_cast<float*>(lse_arg.data);
  }
  if (q_arg.is_cuda()) {
#ifdef BATCHLLM_WITH_CUDA
    c.require(!workspace_obj.is_none(), "workspace", "is required on CUDA");
    const ViewArg ws_arg = c.parse(workspace_obj, "workspace");
    c.same_device({&q_arg, &ws_arg});
    c.index_array(ws_arg, "float32", {-1});
    const CudaDeviceGuard guard(q_arg.device);  // the plan depends on this device's SM count
    const size_t needed = kernels::cascade_workspace_floats(p.q.shape[0], p.q.shape[1], cache.num_kv_heads,
                                                               p.q.shape[2], p.levels, p.levels.suffix_split != nullptr,
                                                               p.levels.prefix_split != nullptr);
    c.require(static_cast<size_t>(ws_arg.numel()) >= needed, "workspace",
              "holds " + std::to_string(ws_arg.numel()) + " floats, needs " + std::to_string(needed));
    p.workspace = reinterpret_cast<float*>(ws_arg.data);
#endif
  }
  BATCHLLM_DISPATCH(c, q_arg.device, kernels::cascade_decode_attention_cpu(p),
                    kernels::cascade_decode_attention_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

void merge_states(py::handle o_a_obj, py::handle lse_a_obj, py::handle o_b_obj, py::handle lse_b_obj,
                  py::handle o_obj, py::object lse_obj, uintptr_t stream) {
  const ArgChecker c("merge_states");
  const ViewArg oa_arg = c.parse(o_a_obj, "o_a"), la_arg = c.parse(lse_a_obj, "lse_a");
  const ViewArg ob_arg = c.parse(o_b_obj, "o_b"), lb_arg = c.parse(lse_b_obj, "lse_b");
  const ViewArg o_arg = c.parse(o_obj, "o");
  c.same_device({&oa_arg, &la_arg, &ob_arg, &lb_arg, &o_arg});
  kernels::MergeStatesParams p;
  p.o_a = c.tensor(oa_arg, 3);
  p.o_b = c.tensor(ob_arg, 3);
  p.o = c.tensor(o_arg, 3);
  for (int d = 0; d < 3; ++d) {
    c.require(p.o_b.shape[d] == p.o_a.shape[d], "o_b", "must have o_a's shape");
    c.require(p.o.shape[d] == p.o_a.shape[d], "o", "must have o_a's shape");
  }
  c.require(p.o_b.dtype == p.o_a.dtype, "o_b", "must have o_a's dtype");
  c.require(p.o.dtype == p.o_a.dtype, "o", "must have o_a's dtype");
  c.index_array(la_arg, "float32", {p.o_a.shape[0], p.o_a.shape[1]});
  c.index_array(lb_arg, "float32", {p.o_a.shape[0], p.o_a.shape[1]});
  p.lse_a = reinterpret_cast<const float*>(la_arg.data);
  p.lse_b = reinterpret_cast<const float*>(lb_arg.data);
  if (!lse_obj.is_none()) {
    const ViewArg lse_arg = c.parse(lse_obj, "lse");
    c.same_device({&oa_arg, &lse_arg});
    c.index_array(lse_arg, "float32", {p.o_a.shape[0], p.o_a.shape[1]});
    p.lse = reinterpret_cast<float*>(lse_arg.data);
  }
  BATCHLLM_DISPATCH(c, oa_arg.device, kernels::merge_states_cpu(p),
                    kernels::merge_states_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

void sample_rows(py::handle logits_obj, py::handle temperature_obj, py::handle keys_obj, py::handle token_ids_obj,
                 py::handle lse_obj, py::handle logprobs_obj, py::handle filters_obj, uintptr_t stream) {
  const ArgChecker c("sample_rows");
  const ViewArg logits_arg = c.parse(logits_obj, "logits"), temperature_arg = c.parse(temperature_obj, "temperature");
  const ViewArg keys_arg = c.parse(keys_obj, "keys"), ids_arg = c.parse(token_ids_obj, "token_ids");
  const ViewArg lse_arg = c.parse(lse_obj, "lse"), logprobs_arg = c.parse(logprobs_obj, "logprobs");
  c.same_device({&logits_arg, &temperature_arg, &keys_arg, &ids_arg, &lse_arg, &logprobs_arg});
  kernels::SampleRowsParams p;
  p.logits = c.tensor(logits_arg, 2);
  const int64_t rows = p.logits.shape[0];
  c.require(rows == 0 || p.logits.shape[1] > 0, "logits", "must have at least one column");
  c.require(p.logits.shape[1] <= (int64_t{1} << 31), "logits", "must have at most 2^31 columns");
  c.index_array(temperature_arg, "float32", {rows});
  c.index_array(keys_arg, "int64", {rows});
  c.index_array(ids_arg, "int64", {rows});
  c.index_array(lse_arg, "float32", {rows});
  c.index_array(logprobs_arg, "float32", {rows});
  p.temperature = reinterpret_cast<const float*>(temperature_arg.data);
  p.keys = reinterpret_cast<const int64_t*>(keys_arg.data);
  p.token_ids = reinterpret_cast<int64_t*>(ids_arg.data);
  p.lse = reinterpret_cast<float*>(lse_arg.data);
  p.logprobs = reinterpret_cast<float*>(logprobs_arg.data);
  if (!filters_obj.is_none()) {
    c.require(py::isinstance<py::tuple>(filters_obj) && py::len(filters_obj) == 3, "filters",
              "must be (top_k, top_p, min_p) or None");
    const auto filters = py::reinterpret_borrow<py::tuple>(filters_obj);
    const ViewArg top_k_arg = c.parse(filters[0], "top_k"), top_p_arg = c.parse(filters[1], "top_p");
    const ViewArg min_p_arg = c.parse(filters[2], "min_p");
    c.same_device({&logits_arg, &top_k_arg, &top_p_arg, &min_p_arg});
    c.index_array(top_k_arg, "int64", {rows});
    c.index_array(top_p_arg, "float32", {rows});
    c.index_array(min_p_arg, "float32", {rows});
    p.top_k = reinterpret_cast<const int64_t*>(top_k_arg.data);
    p.top_p = reinterpret_cast<const float*>(top_p_arg.data);
    p.min_p = reinterpret_cast<const float*>(min_p_arg.data);
  }
  BATCHLLM_DISPATCH(c, logits_arg.device, kernels::sample_rows_cpu(p),
                    kernels::sample_rows_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

/// Requires `view` to have `like`'s dtype and shape in every dim but `skip_dim` (-1: none).
void same_layout(const ArgChecker& c, const std::string& name, const TensorView& view, const std::string& like_name,
                 const TensorView& like, int skip_dim = -1) {
  c.require(view.dtype == like.dtype, name, std::string("must have ") + like_name + "'s dtype " +
                                                kernels::dtype_name(like.dtype));
  for (int d = 0; d < like.ndim; ++d) {
    if (d != skip_dim) c.require(view.shape[d] == like.shape[d], name, "must have " + like_name + "'s shape");
  }
}

void rms_norm(py::handle x_obj, py::handle residual_obj, py::handle weight_obj, py::handle out_obj, float eps,
              uintptr_t stream) {
  const ArgChecker c("rms_norm");
  const ViewArg x_arg = c.parse(x_obj, "x"), weight_arg = c.parse(weight_obj, "weight");
  const ViewArg out_arg = c.parse(out_obj, "out");
  c.same_device({&x_arg, &weight_arg, &out_arg});
  kernels::RmsNormParams p;
  p.x = c.tensor(x_arg, 2);
  p.weight = c.tensor(weight_arg, 1);
  p.out = c.tensor(out_arg, 2);
  p.eps = eps;
  same_layout(c, "out", p.out, "x", p.x);
  c.require(p.weight.dtype == p.x.dtype && p.weight.shape[0] == p.x.shape[1], "weight",
            "must be [" + std::to_string(p.x.shape[1]) + "] in x's dtype");
  c.require(eps >= 0.0f, "eps", "must be >= 0");
  if (!residual_obj.is_none()) {
    const ViewArg residual_arg = c.parse(residual_obj, "residual");
    c.same_device({&x_arg, &residual_arg});
    p.residual = c.tensor(residual_arg, 2);
    same_layout(c, "residual", p.residual, "x", p.x);
  }
  BATCHLLM_DISPATCH(c, x_arg.device, kernels::rms_norm_cpu(p),
                    kernels::rms_norm_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

void silu_and_mul(py::handle gate_up_obj, py::handle out_obj, uintptr_t stream) {
  const ArgChecker c("silu_and_mul");
  const ViewArg gate_up_arg = c.parse(gate_up_obj, "gate_up"), out_arg = c.parse(out_obj, "out");
  c.same_device({&gate_up_arg, &out_arg});
  kernels::SiluAndMulParams p;
  p.gate_up = c.tensor(gate_up_arg, 2);
  p.out = c.tensor(out_arg, 2);
  c.require(p.gate_up.shape[1] % 2 == 0, "gate_up", "must have an even last dim (gate then up)");
  same_layout(c, "out", p.out, "gate_up", p.gate_up, 1);
  c.require(p.out.shape[1] * 2 == p.gate_up.shape[1], "out", "must be half as wide as gate_up");
  BATCHLLM_DISPATCH(c, gate_up_arg.device, kernels::silu_and_mul_cpu(p),
                    kernels::silu_and_mul_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

void rotary_embedding(py::handle q_obj, py::handle k_obj, py::handle positions_obj, py::handle inv_freq_obj,
                      py::object store_obj, uintptr_t stream, bool check_indices) {
  const ArgChecker c("rotary_embedding");
  const ViewArg q_arg = c.parse(q_obj, "q"), k_arg = c.parse(k_obj, "k");
  const ViewArg positions_arg = c.parse(positions_obj, "positions"), inv_freq_arg = c.parse(inv_freq_obj, "inv_freq");
  c.same_device({&q_arg, &k_arg, &positions_arg, &inv_freq_arg});
  kernels::RotaryParams p;
  p.q = c.tensor(q_arg, 3);
  p.k = c.tensor(k_arg, 3);
  c.require(p.k.dtype == p.q.dtype, "k", std::string("must have q's dtype ") + kernels::dtype_name(p.q.dtype));
  c.require(p.k.shape[0] == p.q.shape[0] && p.k.shape[2] == p.q.shape[2], "k", "must have q's tokens and head dim");
  c.require(p.q.shape[2] % 2 == 0, "q", "must have an even head dim");
  c.index_array(positions_arg, "int32", {p.q.shape[0]});
  c.index_array(inv_freq_arg, "float32", {p.q.shape[2] / 2});
  p.positions = reinterpret_cast<const int32_t*>(positions_arg.data);
  p.inv_freq = reinterpret_cast<const float*>(inv_freq_arg.data);
  if (!store_obj.is_none()) {  // the fused store: (v, k_cache, v_cache, slot_mapping)
    const py::tuple store = store_obj.cast<py::tuple>();
    c.require(store.size() == 4, "store", "must be (v, k_cache, v_cache, slot_mapping)");
    const kernels::StoreKvParams s = check_store_args(c, k_arg, p.k, store[0], store[1], store[2], store[3],
                                                      check_indices);
    p.v = s.v;
    p.k_cache = s.k_cache;
    p.v_cache = s.v_cache;
    p.slot_mapping = s.slot_mapping;
  }
  BATCHLLM_DISPATCH(c, q_arg.device, kernels::rotary_embedding_cpu(p),
                    kernels::rotary_embedding_cuda(p, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace

void register_kernels(py::module_& m) {
  m.def("store_kv", &store_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("stream"), py::arg("check_indices"),
        "Scatter K/V rows [T, Hkv, D] into paged caches at slot_mapping (int64 [T]; < 0 skipped). Views are "
        "(data_ptr, dtype, shape, strides, device) tuples; use batchllm_core.ops.store_kv.");
  m.def("prefill_attention", &prefill_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("query_start"), py::arg("context_lens"), py::arg("o"), py::arg("scale"),
        py::arg("max_q_len"), py::arg("stream"), py::arg("check_indices"),
        "Ragged causal attention over paged context; use batchllm_core.ops.prefill_attention.");
  m.def("cascade_decode_attention", &cascade_decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("levels"), py::arg("hints"), py::arg("o"), py::arg("lse"), py::arg("workspace"), py::arg("scale"),
        py::arg("stream"), py::arg("check_indices"),
        "Shared-prefix decode attention by levels; use batchllm_core.ops.cascade_decode_attention.");
  m.def("merge_states", &merge_states, py::arg("o_a"), py::arg("lse_a"), py::arg("o_b"), py::arg("lse_b"),
        py::arg("o"), py::arg("lse"), py::arg("stream"),
        "Merge two partial attention states by log-sum-exp; use batchllm_core.ops.merge_states.");
  m.def("sample_rows", &sample_rows, py::arg("logits"), py::arg("temperature"), py::arg("keys"),
        py::arg("token_ids"), py::arg("lse"), py::arg("logprobs"), py::arg("filters"), py::arg("stream"),
        "One token per row of logits (greedy, or Gumbel-max over what the rows' filters (top_k, top_p, min_p) "
        "or None keep) with each row's logsumexp and the token's logprob; use batchllm_core.ops.sample_rows.");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"), py::arg("eps"),
        py::arg("stream"),
        "RMSNorm of x's rows (residual, if not None, first gets x added in place and is normalised instead); "
        "use batchllm_core.ops.rms_norm.");
  m.def("silu_and_mul", &silu_and_mul, py::arg("gate_up"), py::arg("out"), py::arg("stream"),
        "silu(gate) * up of gate_up = [gate | up]; use batchllm_core.ops.silu_and_mul.");
  m.def("rotary_embedding", &rotary_embedding, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("inv_freq"),
        py::arg("store"), py::arg("stream"), py::arg("check_indices"),
        "Rotate-half rope of q and k in place, then (store: (v, k_cache, v_cache, slot_mapping) or None) the "
        "rotated k and v rows to their paged slots; use batchllm_core.ops.rotary_embedding.");
  m.def("cuda_kernel_head_dims", [] {
    std::vector<int> dims;
    for (int d : {64, 128}) {
      if (cuda_head_dim_ok(d)) dims.push_back(d);
    }
    return dims;
  }, "Head dims the CUDA attention kernels are built for (empty without CUDA).");
  m.def("cuda_tile_kernel", [](const std::string& use, int64_t head_dim) -> std::string {
    if (use != "prefix" && use != "prefill") {
      throw py::value_error("cuda_tile_kernel: argument 'use' must be 'prefix' or 'prefill', got '" + use + "'");
    }
#ifdef BATCHLLM_WITH_CUDA
    return kernels::cuda_tile_kernel_name(use == "prefill", head_dim);
#else
    return "";
#endif
  }, py::arg("use") = "prefix", py::arg("head_dim") = 128,
     "The tile kernel that cascade-prefix ('prefix') or prefill ('prefill') tiles of head_dim run on the "
     "current device under the current BATCHLLM_ATTENTION_TILES ('' without CUDA): 'wgmma' or 'wgmma-pipe' "
     "asked for without sm_90a code or a compute 9.0 device reads 'mma128', the kernel that runs instead.");
  m.def("cascade_workspace_floats", [](int64_t num_rows, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                       int64_t num_prefixes, int32_t max_prefix_kv_len, int32_t max_prefix_rows,
                                       int32_t max_suffix_kv_len, bool device_suffix_split,
                                       bool device_prefix_split) -> int64_t {
#ifdef BATCHLLM_WITH_CUDA
    kernels::DecodeLevelsView levels;
    levels.num_prefixes = num_prefixes;
    levels.max_prefix_kv_len = max_prefix_kv_len;
    levels.max_prefix_rows = max_prefix_rows;
    levels.max_suffix_kv_len = max_suffix_kv_len;  // long suffixes of few rows are split: more workspace
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) {
      throw py::value_error("cascade_workspace_floats: argument 'num_kv_heads' must divide num_q_heads");
    }
    return static_cast<int64_t>(kernels::cascade_workspace_floats(num_rows, num_q_heads, num_kv_heads, head_dim,
                                                                  levels, device_suffix_split, device_prefix_split));
#else
    return 0;
#endif
  }, py::arg("num_rows"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("num_prefixes"),
     py::arg("max_prefix_kv_len"), py::arg("max_prefix_rows"), py::arg("max_suffix_kv_len"),
     py::arg("device_suffix_split") = false, py::arg("device_prefix_split") = false,
     "float32 scratch elements the CUDA cascade kernel needs (0 without CUDA); device_suffix_split, "
     "device_prefix_split: the levels will carry a suffix_split / prefix_split array.");
  m.def("cascade_prefix_split", [](int64_t num_prefixes, int64_t max_rows, int64_t max_len, int64_t bucket_prefixes,
                                   int64_t bucket_rows, int64_t bucket_len, int64_t num_q_heads, int64_t num_kv_heads,
                                   int64_t head_dim, const std::string& dtype) -> std::array<int32_t, 3> {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) {
      throw py::value_error("cascade_prefix_split: argument 'num_kv_heads' must divide num_q_heads");
    }
    if (num_prefixes < 0 || max_rows < 0 || max_len < 0 || bucket_prefixes < num_prefixes ||
        bucket_rows < max_rows || bucket_len < max_len) {
      throw py::value_error("cascade_prefix_split: the step's sizes must be >= 0 and within the bucket's");
    }
    if (dtype != "float16" && dtype != "bfloat16") {
      throw py::value_error("cascade_prefix_split: argument 'dtype' must be 'float16' or 'bfloat16', got '" +
                            dtype + "'");
    }
#ifdef BATCHLLM_WITH_CUDA
    if (!kernels::cuda_head_dim_supported(head_dim)) {
      throw py::value_error("cascade_prefix_split: argument 'head_dim' " + std::to_string(head_dim) +
                            " has no CUDA kernels");
    }
    return kernels::cascade_prefix_split(num_prefixes, max_rows, max_len, bucket_prefixes, bucket_rows, bucket_len,
                                         num_q_heads, num_kv_heads, head_dim,
                                         dtype == "float16" ? DType::kFloat16 : DType::kBFloat16);
#else
    const int64_t chunk = std::max<int64_t>(64, (max_len + 63) / 64 * 64);
    return {1, static_cast<int32_t>(std::min<int64_t>(chunk, 1 << 30)), static_cast<int32_t>(max_rows)};
#endif
  }, py::arg("num_prefixes"), py::arg("max_rows"), py::arg("max_len"), py::arg("bucket_prefixes"),
     py::arg("bucket_rows"), py::arg("bucket_len"), py::arg("num_q_heads"), py::arg("num_kv_heads"),
     py::arg("head_dim"), py::arg("dtype"),
     "The prefix key split {splits, chunk_keys, state_rows} of a decode step launched with a graph "
     "bucket's hints (the levels' prefix_split array; on the current device). Without CUDA: unsplit.");
  m.def("cascade_suffix_split", [](int64_t rows, int64_t padded_rows, int64_t num_q_heads, int64_t num_kv_heads,
                                   int64_t max_suffix_kv_len) -> std::array<int32_t, 3> {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) {
      throw py::value_error("cascade_suffix_split: argument 'num_kv_heads' must divide num_q_heads");
    }
    if (rows < 0 || padded_rows < rows || max_suffix_kv_len < 0) {
      throw py::value_error("cascade_suffix_split: needs 0 <= rows <= padded_rows and max_suffix_kv_len >= 0");
    }
#ifdef BATCHLLM_WITH_CUDA
    return kernels::cascade_suffix_split(rows, padded_rows, num_q_heads, num_kv_heads, max_suffix_kv_len);
#else
    return {1, 1 << 30, static_cast<int32_t>(padded_rows)};
#endif
  }, py::arg("rows"), py::arg("padded_rows"), py::arg("num_q_heads"), py::arg("num_kv_heads"),
     py::arg("max_suffix_kv_len"),
     "The suffix key split {splits, chunk_keys, rows covered} of a decode step of `rows` rows launched "
     "as `padded_rows` (the levels' suffix_split array; on the current device). Without CUDA: unsplit.");
}

}  // namespace batchllm::bindings
