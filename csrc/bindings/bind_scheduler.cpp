// Bindings of the scheduler: argument checks and m.def only. StepPlan arrays are zero-copy numpy
// views over the scheduler's buffers (valid until the next next_step/commit).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "batchllm/scheduler.h"
#include "bindings/registry.h"

namespace py = pybind11;

namespace batchllm::bindings {
namespace {

template <typename T>
py::array view(const std::vector<T>& data, std::vector<py::ssize_t> shape, py::handle owner) {
  static const T empty{};
  py::array arr(py::dtype::of<T>(), std::move(shape), data.empty() ? &empty : data.data(), owner);
  // Views of the scheduler's own buffers: read-only, so a caller cannot corrupt the next step's plan.
  py::detail::array_proxy(arr.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return arr;
}

template <typename T>
py::array view1(const std::vector<T>& data, py::handle owner) {
  return view(data, {static_cast<py::ssize_t>(data.size())}, owner);
}

// A 1-D array of integers converted to T; names the argument when it is not one.
template <typename T>
std::vector<T> to_vector(const py::handle& value, const char* name) {
  py::array arr = py::array::ensure(value);
  if (!arr) throw py::value_error(std::string(name) + " must be an array of integers");
  if (arr.ndim() != 1) throw py::value_error(std::string(name) + " must be one-dimensional");
  if (arr.size() > 0 && arr.dtype().kind() != 'i' && arr.dtype().kind() != 'u' && arr.dtype().kind() != 'b')
    throw py::value_error(std::string(name) + " must hold integers, got dtype " + std::string(py::str(arr.dtype())));
  auto typed = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(arr);
  if (!typed) throw py::value_error(std::string(name) + " could not be converted");
  return std::vector<T>(typed.data(), typed.data() + typed.size());
}

py::dict stats_dict(const Scheduler& s) {
  const SchedulerStats st = s.stats();
  py::dict d;
  d["steps"] = st.steps;
  d["prefill_tokens"] = st.prefill_tokens;
  d["decode_tokens"] = st.decode_tokens;
  d["peak_kv_blocks"] = st.peak_kv_blocks;
  d["preemptions"] = st.preemptions;
  d["cached_prefix_tokens"] = st.cached_prefix_tokens;
  d["finished_sequences"] = st.finished_sequences;
  d["failed_requests"] = st.failed_requests;
  d["prefix_nodes"] = st.prefix_nodes;
  d["planned_prefill_tokens"] = st.planned_prefill_tokens;
  d["discarded_rows"] = st.discarded_rows;
  d["policy"] = policy_name(s.config().policy);
  d["num_blocks"] = s.config().num_blocks;
  d["block_size"] = s.config().block_size;
  return d;
}

void bind_step_plan(py::module_& m) {
  py::class_<StepPlan> plan(m, "StepPlan",
                            "One engine step as flat arrays (numpy views valid until the next next_step/commit).");
#define BATCHLLM_PLAN_ARRAY(field) \
  plan.def_property_readonly(#field, [](py::object self) { return view1(self.cast<const StepPlan&>().field, self); })
  BATCHLLM_PLAN_ARRAY(input_ids);
  BATCHLLM_PLAN_ARRAY(positions);
  BATCHLLM_PLAN_ARRAY(slot_mapping);
  BATCHLLM_PLAN_ARRAY(seq_ids);
  BATCHLLM_PLAN_ARRAY(query_start);
  BATCHLLM_PLAN_ARRAY(context_lens);
  BATCHLLM_PLAN_ARRAY(prefix_kv_indptr);
  BATCHLLM_PLAN_ARRAY(prefix_kv_blocks);
  BATCHLLM_PLAN_ARRAY(prefix_kv_lens);
  BATCHLLM_PLAN_ARRAY(suffix_kv_lens);
  BATCHLLM_PLAN_ARRAY(sample_rows);
  BATCHLLM_PLAN_ARRAY(sample_seq_ids);
  BATCHLLM_PLAN_ARRAY(sample_requests);
  BATCHLLM_PLAN_ARRAY(sample_indices);
  BATCHLLM_PLAN_ARRAY(sample_output_lens);
  BATCHLLM_PLAN_ARRAY(cow_src);
  BATCHLLM_PLAN_ARRAY(cow_dst);
  BATCHLLM_PLAN_ARRAY(nano_batch_offsets);
#undef BATCHLLM_PLAN_ARRAY
  plan.def_property_readonly("block_tables", [](py::object self) {
    const StepPlan& p = self.cast<const StepPlan&>();
    return view(p.block_tables, {static_cast<py::ssize_t>(p.num_seqs()), p.max_blocks}, self);
  });
  plan.def_property_readonly("suffix_block_tables", [](py::object self) {
    const StepPlan& p = self.cast<const StepPlan&>();
    return view(p.suffix_block_tables, {static_cast<py::ssize_t>(p.num_decode_seqs), p.max_suffix_blocks}, self);
  });
  plan.def_property_readonly("prefix_q_range", [](py::object self) {
    const StepPlan& p = self.cast<const StepPlan&>();
    return view(p.prefix_q_range, {static_cast<py::ssize_t>(p.num_prefixes()), 2}, self);
  });
  plan.def_readonly("max_blocks", &StepPlan::max_blocks)
      .def_readonly("max_suffix_blocks", &StepPlan::max_suffix_blocks)
      .def_readonly("num_decode_seqs", &StepPlan::num_decode_seqs)
      .def_readonly("num_prefill_tokens", &StepPlan::num_prefill_tokens)
      .def_readonly("decode_kv_tokens_read", &StepPlan::decode_kv_tokens_read)
      .def_readonly("decode_kv_tokens_unshared", &StepPlan::decode_kv_tokens_unshared)
      .def_property_readonly("num_tokens", &StepPlan::num_tokens)
      .def_property_readonly("num_seqs", &StepPlan::num_seqs)
      .def_property_readonly("num_sample_rows", &StepPlan::num_sample_rows)
      .def_property_readonly("num_prefixes", &StepPlan::num_prefixes);
}

SchedulerConfig make_config(int64_t num_blocks, int block_size, int64_t token_budget, const std::string& policy,
                            int64_t max_num_seqs, int64_t tile_tokens, int max_prefix_depth, double watermark,
                            int64_t admission_horizon) {
  if (num_blocks < 1) throw py::value_error("num_blocks must be >= 1, got " + std::to_string(num_blocks));
  if (block_size < 1) throw py::value_error("block_size must be >= 1, got " + std::to_string(block_size));
  if (token_budget < 1) throw py::value_error("token_budget must be >= 1, got " + std::to_string(token_budget));
  if (tile_tokens < 1) throw py::value_error("tile_tokens must be >= 1, got " + std::to_string(tile_tokens));
  if (max_num_seqs < 1) throw py::value_error("max_num_seqs must be >= 1, got " + std::to_string(max_num_seqs));
  if (max_prefix_depth < 1 || max_prefix_depth > 32)
    throw py::value_error("max_prefix_depth must be in [1, 32], got " + std::to_string(max_prefix_depth));
  if (!(watermark >= 0 && watermark < 1)) throw py::value_error("watermark must be in [0, 1)");
  if (admission_horizon < 0) throw py::value_error("admission_horizon must be >= 0 (0: unlimited)");
  SchedulerConfig c;
  c.num_blocks = num_blocks;
  c.block_size = block_size;
  c.token_budget = token_budget;
  c.tile_tokens = tile_tokens;
  c.max_num_seqs = max_num_seqs;
  try {
    c.policy = parse_policy(policy);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  c.max_prefix_depth = max_prefix_depth;
  c.watermark = watermark;
  c.admission_horizon = admission_horizon;
  return c;
}

}  // namespace

void register_scheduler(py::module_& m) {
  bind_step_plan(m);
  py::class_<Scheduler>(m, "Scheduler", "Global prefix-sharing scheduler: add_requests, then next_step/commit.")
      .def(py::init([](int64_t num_blocks, int block_size, int64_t token_budget, const std::string& policy,
                       int64_t max_num_seqs, int64_t tile_tokens, int max_prefix_depth, double watermark,
                       int64_t admission_horizon) {
             return std::make_unique<Scheduler>(make_config(num_blocks, block_size, token_budget, policy, max_num_seqs,
                                                            tile_tokens, max_prefix_depth, watermark,
                                                            admission_horizon));
           }),
           py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("token_budget") = 2048, py::arg("policy") = "batchllm", py::arg("max_num_seqs") = 1024,
           py::arg("tile_tokens") = 128, py::arg("max_prefix_depth") = 8, py::arg("watermark") = 0.01,
           py::arg("admission_horizon") = 128)
      .def(
          "add_requests",
          [](Scheduler& s, py::handle tokens, py::handle offsets, py::handle max_tokens, py::handle num_samples,
             py::handle min_tokens, py::handle ignore_eos, py::handle stop_token_ids, py::handle stop_token_offsets,
             std::vector<int32_t> eos_token_ids) {
            JobRequests job;
            job.tokens = to_vector<int32_t>(tokens, "tokens");
            job.offsets = to_vector<int64_t>(offsets, "offsets");
            job.max_tokens = to_vector<int32_t>(max_tokens, "max_tokens");
            job.num_samples = to_vector<int32_t>(num_samples, "num_samples");
            job.min_tokens = to_vector<int32_t>(min_tokens, "min_tokens");
            job.ignore_eos = to_vector<uint8_t>(ignore_eos, "ignore_eos");
            job.stop_token_ids = to_vector<int32_t>(stop_token_ids, "stop_token_ids");
            job.stop_offsets = to_vector<int64_t>(stop_token_offsets, "stop_token_offsets");
            job.eos_token_ids = std::move(eos_token_ids);
            const std::string problem = job.validate();
            if (!problem.empty()) throw py::value_error("add_requests: " + problem);
            try {
              py::gil_scoped_release release;
              s.add_requests(std::move(job));
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("tokens"), py::arg("offsets"), py::arg("max_tokens"), py::arg("num_samples"), py::arg("min_tokens"),
          py::arg("ignore_eos"), py::arg("stop_token_ids"), py::arg("stop_token_offsets"),
          py::arg("eos_token_ids") = std::vector<int32_t>{})
      .def(
          "next_step",
          [](Scheduler& s, bool overlap) -> const StepPlan* {
            try {
              return s.next_step(overlap);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("overlap") = false, py::return_value_policy::reference_internal)
      .def("last_discarded_rows",
           [](const Scheduler& s) {
             const std::vector<int32_t>& rows = s.last_discarded_rows();
             return py::array_t<int32_t>(static_cast<py::ssize_t>(rows.size()), rows.data());
           })
      .def(
          "commit",
          [](Scheduler& s, py::array_t<int32_t, py::array::c_style | py::array::forcecast> sampled) {
            if (sampled.ndim() != 1) throw py::value_error("sampled must be one-dimensional");
            try {
              s.commit(sampled.data(), sampled.size());
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("sampled"))
      .def(
          "finish_sequence",
          [](Scheduler& s, int64_t seq_id, const std::string& reason) {
            try {
              s.finish_sequence(seq_id, reason);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("seq_id"), py::arg("reason") = "stop")
      .def("pop_finished",
           [](Scheduler& s) {
             py::list result;
             for (FinishedSequence& f : s.pop_finished())
               result.append(py::make_tuple(f.request, f.sample_index, py::cast(f.token_ids), f.finish_reason));
             return result;
           })
      .def("pop_failed",
           [](Scheduler& s) {
             py::list result;
             for (FailedRequest& f : s.pop_failed()) result.append(py::make_tuple(f.request, f.message));
             return result;
           })
      .def("stats", &stats_dict)
      .def("step_token_counts",
           [](const Scheduler& s) {
             const std::vector<int32_t>& counts = s.step_token_counts();
             return py::array_t<int32_t>(static_cast<py::ssize_t>(counts.size()), counts.data());
           })
      .def("check_integrity", &Scheduler::check_integrity)
      .def_property_readonly("num_free_blocks", &Scheduler::num_free_blocks)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("done", &Scheduler::done)
      .def_property_readonly("num_blocks", [](const Scheduler& s) { return s.config().num_blocks; })
      .def_property_readonly("block_size", [](const Scheduler& s) { return s.config().block_size; })
      .def_property_readonly("policy", [](const Scheduler& s) { return std::string(policy_name(s.config().policy)); });
}

}  // namespace batchllm::bindings
