// _C.PrefixTree / _C.SharingPlan: argument checks and m.def only (logic in csrc/runtime/prefix_tree*.cpp).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "batchllm/prefix_tree.h"
#include "bindings/registry.h"

namespace py = pybind11;

namespace batchllm::bindings {
namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style>;
using Int64Array = py::array_t<int64_t, py::array::c_style>;

std::string dtype_name(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) return py::str(obj.attr("dtype")).cast<std::string>();
  return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
}

// A 1-D numpy array of exactly dtype T, without copying when it is already C-contiguous.
template <typename T>
py::array_t<T, py::array::c_style> exact_1d(const py::object& obj, const char* arg, const char* dtype) {
  if (!py::isinstance<py::array_t<T>>(obj))
    throw py::value_error(std::string(arg) + " must be a numpy " + dtype + " array, got " + dtype_name(obj));
  auto arr = py::array_t<T, py::array::c_style>::ensure(obj);  // a copy only if it was strided
  if (arr.ndim() != 1)
    throw py::value_error(std::string(arg) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dims");
  return arr;
}

void insert_arrays(PrefixTree& tree, const py::object& tokens_obj, const py::object& offsets_obj) {
  Int32Array tokens = exact_1d<int32_t>(tokens_obj, "tokens", "int32");
  Int64Array offsets = exact_1d<int64_t>(offsets_obj, "offsets", "int64");
  const int64_t num_tokens = tokens.shape(0);
  const int64_t num_offsets = offsets.shape(0);
  if (num_offsets < 1) throw py::value_error("offsets must hold num_prompts + 1 entries (at least 1)");
  const int64_t* off = offsets.data();
  const int32_t* tok = tokens.data();
  if (off[0] < 0 || off[0] > num_tokens)
    throw py::value_error("offsets[0] = " + std::to_string(off[0]) + " is outside tokens [0, " +
                          std::to_string(num_tokens) + "]");
  for (int64_t i = 1; i < num_offsets; ++i) {
    if (off[i] < off[i - 1])
      throw py::value_error("offsets must be non-decreasing: offsets[" + std::to_string(i) + "] = " +
                            std::to_string(off[i]) + " < offsets[" + std::to_string(i - 1) + "] = " +
                            std::to_string(off[i - 1]));
  }
  if (off[num_offsets - 1] > num_tokens)
    throw py::value_error("offsets[-1] = " + std::to_string(off[num_offsets - 1]) + " exceeds len(tokens) = " +
                          std::to_string(num_tokens));
  // Token ids are checked by the tree as it stores them (std::invalid_argument -> ValueError, tree unchanged).
  tree.insert(tok, off, num_offsets - 1);
}

// One prompt of insert_list: a 1-D integer numpy array or a sequence of Python ints.
void append_prompt(const py::handle& seq, size_t index, std::vector<int32_t>& flat) {
  const std::string where = "prompts[" + std::to_string(index) + "]";
  auto check_id = [&](long long id) {
    if (id < 0 || id > std::numeric_limits<int32_t>::max())
      throw py::value_error(where + " holds token id " + std::to_string(id) + " outside [0, 2^31)");
    flat.push_back(static_cast<int32_t>(id));
  };
  if (py::isinstance<py::array>(seq)) {
    auto arr = py::reinterpret_borrow<py::array>(seq);
    const char kind = arr.dtype().kind();
    if ((kind != 'i' && kind != 'u') || arr.ndim() != 1)
      throw py::value_error(where + " must be a 1-D integer array, got " + dtype_name(seq) + " with " +
                            std::to_string(arr.ndim()) + " dims");
    auto ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(seq);
    if (!ids) throw py::value_error(where + " does not fit int64");
    for (py::ssize_t i = 0; i < ids.shape(0); ++i) check_id(ids.data()[i]);
    return;
  }
  if (py::isinstance<py::str>(seq) || py::isinstance<py::bytes>(seq) || !py::isinstance<py::sequence>(seq))
    throw py::value_error(where + " must be a list of token ids or a 1-D integer array, got " + dtype_name(seq));
  for (const py::handle item : py::reinterpret_borrow<py::sequence>(seq)) {
    if (!PyLong_Check(item.ptr()))
      throw py::value_error(where + " holds a " + dtype_name(item) + "; token ids must be ints");
    int overflow = 0;
    const long long id = PyLong_AsLongLongAndOverflow(item.ptr(), &overflow);
    if (overflow != 0) throw py::value_error(where + " holds a token id outside [0, 2^31)");
    check_id(id);
  }
}

void insert_list(PrefixTree& tree, const py::object& prompts) {
  if (!py::isinstance<py::sequence>(prompts) || py::isinstance<py::str>(prompts))
    throw py::value_error("prompts must be a list of token-id lists or 1-D integer arrays");
  auto seqs = py::reinterpret_borrow<py::sequence>(prompts);
  std::vector<int32_t> flat;
  std::vector<int64_t> offsets{0};
  offsets.reserve(seqs.size() + 1);
  size_t index = 0;
  for (const py::handle seq : seqs) {
    append_prompt(seq, index++, flat);
    offsets.push_back(static_cast<int64_t>(flat.size()));
  }
  tree.insert(flat.data(), offsets.data(), static_cast<int64_t>(offsets.size() - 1));
}

void check_grouping_args(int block_size, int64_t min_prefix_tokens) {
  if (block_size < 1) throw py::value_error("block_size must be >= 1, got " + std::to_string(block_size));
  if (min_prefix_tokens < 0)
    throw py::value_error("min_prefix_tokens must be >= 0, got " + std::to_string(min_prefix_tokens));
}

template <typename T, typename F>
py::array_t<T> per_prefix(const SharingPlan& plan, F field) {
  py::array_t<T> out(static_cast<py::ssize_t>(plan.prefixes.size()));
  T* data = out.mutable_data();
  for (size_t i = 0; i < plan.prefixes.size(); ++i) data[i] = static_cast<T>(field(plan.prefixes[i]));
  return out;
}

void bind_sharing_plan(py::module_& m) {
  py::class_<SharingPlan>(m, "SharingPlan",
                          "How a job shares prefixes: prefixes ordered parents before children; each is "
                          "tokens [begin, end) of every request in its reader list. Fields are numpy copies.")
      .def_property_readonly("num_prefixes", [](const SharingPlan& p) { return p.prefixes.size(); })
      .def("__len__", [](const SharingPlan& p) { return p.prefixes.size(); })
      .def_property_readonly("parent", [](const SharingPlan& p) {
        return per_prefix<int32_t>(p, [](const SharedPrefix& s) { return s.parent; });
      }, "int32 [P]: enclosing prefix, -1 at top")
      .def_property_readonly("depth", [](const SharingPlan& p) {
        return per_prefix<int32_t>(p, [](const SharedPrefix& s) { return s.depth; });
      }, "int32 [P]: 0 for a top-level prefix")
      .def_property_readonly("begin", [](const SharingPlan& p) {
        return per_prefix<int64_t>(p, [](const SharedPrefix& s) { return s.begin; });
      }, "int64 [P]: first token of the level (the parent's end)")
      .def_property_readonly("end", [](const SharingPlan& p) {
        return per_prefix<int64_t>(p, [](const SharedPrefix& s) { return s.end; });
      }, "int64 [P]: one past the level's last token (a multiple of the block size)")
      .def_property_readonly("request_indptr", [](const SharingPlan& p) {
        py::array_t<int64_t> out(static_cast<py::ssize_t>(p.prefixes.size() + 1));
        int64_t* data = out.mutable_data();
        data[0] = 0;
        for (size_t i = 0; i < p.prefixes.size(); ++i)
          data[i + 1] = data[i] + static_cast<int64_t>(p.prefixes[i].requests.size());
        return out;
      }, "int64 [P+1]: readers of prefix i are requests[request_indptr[i]:request_indptr[i+1]]")
      .def_property_readonly("requests", [](const SharingPlan& p) {
        size_t total = 0;
        for (const auto& s : p.prefixes) total += s.requests.size();
        py::array_t<int64_t> out(static_cast<py::ssize_t>(total));
        int64_t* data = out.mutable_data();
        for (const auto& s : p.prefixes) data = std::copy(s.requests.begin(), s.requests.end(), data);
        return out;
      }, "int64 [sum of readers]: every prefix's readers (input indices, ascending), concatenated")
      .def("prefix_requests", [](const SharingPlan& p, int64_t i) {
        if (i < 0 || i >= static_cast<int64_t>(p.prefixes.size()))
          throw py::value_error("prefix " + std::to_string(i) + " out of range [0, " +
                                std::to_string(p.prefixes.size()) + ")");
        const auto& r = p.prefixes[i].requests;
        return py::array_t<int64_t>(static_cast<py::ssize_t>(r.size()), r.data());
      }, py::arg("prefix"), "int64 [readers]: input indices of the requests reading `prefix`, ascending")
      .def_property_readonly("request_prefix", [](const SharingPlan& p) {
        return py::array_t<int32_t>(static_cast<py::ssize_t>(p.request_prefix.size()), p.request_prefix.data());
      }, "int32 [N]: each request's deepest prefix, -1 when it shares nothing")
      .def("__repr__", [](const SharingPlan& p) {
        return "SharingPlan(num_prefixes=" + std::to_string(p.prefixes.size()) +
               ", num_requests=" + std::to_string(p.request_prefix.size()) + ")";
      });
}

}  // namespace

void register_prefix_tree(py::module_& m) {
  bind_sharing_plan(m);
  py::class_<PrefixTree>(m, "PrefixTree",
                         "Compact radix tree over a job's prompts (token ids int32); groups them into shared "
                         "prefixes (BatchLLM single-level or multi-level).")
      .def(py::init<>())
      .def("insert", &insert_arrays, py::arg("tokens"), py::arg("offsets"),
           "Adds prompts i = 0..len(offsets)-2: tokens[offsets[i]:offsets[i+1]]. tokens: int32 [T], "
           "offsets: int64 [N+1], non-decreasing, within tokens. Read without copying.")
      .def("insert_list", &insert_list, py::arg("prompts"),
           "Adds prompts given as lists of ints or 1-D integer numpy arrays.")
      .def(
          "group_single_level",
          [](const PrefixTree& t, int block_size, int64_t min_prefix_tokens) {
            check_grouping_args(block_size, min_prefix_tokens);
            return t.group_single_level(block_size, min_prefix_tokens);
          },
          py::arg("block_size"), py::arg("min_prefix_tokens") = 0,
          "BatchLLM groups: one prefix level, enlarged by the gain rule, cut to a multiple of block_size.")
      .def(
          "group_multi_level",
          [](const PrefixTree& t, int block_size, int max_depth, int64_t min_prefix_tokens) {
            check_grouping_args(block_size, min_prefix_tokens);
            if (max_depth < 1) throw py::value_error("max_depth must be >= 1, got " + std::to_string(max_depth));
            return t.group_multi_level(block_size, max_depth, min_prefix_tokens);
          },
          py::arg("block_size"), py::arg("max_depth") = 8, py::arg("min_prefix_tokens") = 0,
          "Tree-shaped sharing: every branching read by >= 2 requests is a level (at most max_depth deep).")
      .def(
          "stats",
          [](const PrefixTree& t, const SharingPlan& plan) {
            if (plan.request_prefix.size() != static_cast<size_t>(t.num_requests()))
              throw py::value_error("plan has " + std::to_string(plan.request_prefix.size()) +
                                    " requests, the tree " + std::to_string(t.num_requests()));
            const PrefixTreeStats s = t.stats(plan);  // std::invalid_argument -> ValueError
            py::dict d;
            d["requests"] = s.requests;
            d["prompt_tokens"] = s.prompt_tokens;
            d["prefill_tokens"] = s.prefill_tokens;
            d["shared_tokens"] = s.shared_tokens;
            d["groups"] = s.groups;
            d["nodes"] = s.nodes;
            d["memory_bytes"] = s.memory_bytes;
            return d;
          },
          py::arg("plan"), "dict: requests, prompt_tokens, prefill_tokens, shared_tokens, groups, nodes, memory_bytes")
      .def_property_readonly("num_requests", &PrefixTree::num_requests)
      .def("__len__", &PrefixTree::num_requests)
      .def(
          "prompt_length",
          [](const PrefixTree& t, int64_t request) {
            if (request < 0 || request >= t.num_requests())
              throw py::value_error("request " + std::to_string(request) + " out of range [0, " +
                                    std::to_string(t.num_requests()) + ")");
            return t.prompt_length(request);
          },
          py::arg("request"));
}

}  // namespace batchllm::bindings
