// _C.BlockManager / _C.BlockTable: argument checks and m.def only (logic in csrc/runtime/block_manager.cpp).
#include <pybind11/stl.h>

#include <string>

#include "batchllm/block_manager.h"
#include "bindings/registry.h"

namespace py = pybind11;

namespace batchllm::bindings {
namespace {

void check_block_arg(const BlockManager& bm, int64_t block, const char* arg) {
  if (block < 0 || block >= bm.num_blocks())
    throw py::value_error(std::string(arg) + " = " + std::to_string(block) + " is out of range [0, " +
                          std::to_string(bm.num_blocks()) + ")");
}

// A table handed in from Python may have been edited by hand: it must only read used blocks of this
// pool and its token count must fit its blocks.
void check_table_arg(const BlockManager& bm, const BlockTable& table, const char* arg) {
  for (int32_t block : table.blocks) {
    check_block_arg(bm, block, (std::string(arg) + ".blocks[i]").c_str());
    if (bm.refcount(block) == 0)
      throw py::value_error(std::string(arg) + " reads block " + std::to_string(block) +
                            ", which is free");
  }
  const int64_t capacity = static_cast<int64_t>(table.blocks.size()) * bm.block_size();
  if (table.num_tokens < 0 || table.num_tokens > capacity)
    throw py::value_error(std::string(arg) + ".num_tokens = " + std::to_string(table.num_tokens) +
                          " does not fit its " + std::to_string(table.blocks.size()) + " blocks");
}

}  // namespace

void register_block_manager(py::module_& m) {
  py::class_<BlockTable>(m, "BlockTable", "A sequence's KV blocks, in order, and its filled token slots.")
      .def(py::init<>())
      .def_readwrite("blocks", &BlockTable::blocks, "list[int]: block ids in token order")
      .def_readwrite("num_tokens", &BlockTable::num_tokens, "int: token slots filled")
      .def("__repr__", [](const BlockTable& t) {
        return "BlockTable(blocks=" + py::repr(py::cast(t.blocks)).cast<std::string>() +
               ", num_tokens=" + std::to_string(t.num_tokens) + ")";
      });

  py::class_<BlockManager>(m, "BlockManager",
                           "Fixed pool of refcounted KV blocks of block_size token slots.")
      .def(py::init([](int64_t num_blocks, int block_size) {
             if (num_blocks < 0 || num_blocks > INT32_MAX)
               throw py::value_error("num_blocks must be in [0, 2^31), got " + std::to_string(num_blocks));
             if (block_size < 1)
               throw py::value_error("block_size must be >= 1, got " + std::to_string(block_size));
             return BlockManager(num_blocks, block_size);
           }),
           py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
      .def("blocks_for_tokens", &BlockManager::blocks_for_tokens, py::arg("n"))
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_blocks"))
      .def("allocate_block", &BlockManager::allocate_block, "A free block with refcount 1, or -1.")
      .def(
          "allocate",
          [](BlockManager& bm, int64_t n) -> py::object {
            if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
            std::vector<int32_t> out;
            if (!bm.allocate(n, out)) return py::none();
            return py::cast(out);
          },
          py::arg("n"), "n blocks (list[int]) or None when fewer than n are free; all or nothing.")
      .def(
          "share",
          [](BlockManager& bm, int64_t block) {
            check_block_arg(bm, block, "block");
            bm.share(static_cast<int32_t>(block));
          },
          py::arg("block"))
      .def(
          "release",
          [](BlockManager& bm, int64_t block) {
            check_block_arg(bm, block, "block");
            bm.release(static_cast<int32_t>(block));
          },
          py::arg("block"))
      .def(
          "refcount",
          [](const BlockManager& bm, int64_t block) {
            check_block_arg(bm, block, "block");
            return bm.refcount(static_cast<int32_t>(block));
          },
          py::arg("block"))
      .def(
          "blocks_needed_to_append",
          [](const BlockManager& bm, const BlockTable& table, int64_t n) {
            check_table_arg(bm, table, "table");
            return bm.blocks_needed_to_append(table, n);
          },
          py::arg("table"), py::arg("n"))
      .def(
          "append_slot",
          [](BlockManager& bm, BlockTable& table) {
            check_table_arg(bm, table, "table");
            int32_t cow_src = -1, cow_dst = -1;
            int64_t slot = bm.append_slot(table, &cow_src, &cow_dst);
            return py::make_tuple(slot, cow_src, cow_dst);
          },
          py::arg("table"),
          "(slot, cow_src, cow_dst): slot -1 when no block is free (table unchanged); cow_* -1 unless "
          "slots [0, filled) of cow_src must be copied into cow_dst first.")
      .def(
          "fork",
          [](BlockManager& bm, const BlockTable& table) {
            check_table_arg(bm, table, "table");
            return bm.fork(table);
          },
          py::arg("table"))
      .def(
          "free",
          [](BlockManager& bm, BlockTable& table) {
            check_table_arg(bm, table, "table");
            bm.free(table);
          },
          py::arg("table"))
      .def(
          "check_integrity",
          [](const BlockManager& bm, py::object expected_refs) {
            if (expected_refs.is_none()) return bm.check_integrity();
            return bm.check_integrity(expected_refs.cast<std::vector<int32_t>>());
          },
          py::arg("expected_refs") = py::none(),
          "'' when sound, else what is wrong; expected_refs[b] = references the caller holds on b.");
}

}  // namespace batchllm::bindings
