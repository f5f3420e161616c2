"""Running the GPU op tests without a GPU: the CUDA kernels compiled for the CPU emulation.

`make test` builds `_cuda_emulation` (tests/cpp/cuda_emulation/emulation_module.cpp: the unchanged
kernel bindings over the emulated kernels) and names its folder in BATCHLLM_CUDA_EMULATION_DIR.
`activate` points batchllm_core.ops at it and marks CPU tensors as device 0, so ops.py's CUDA branch,
the bindings' CUDA checks and the CUDA kernel sources run together on the CPU.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

from batchllm_core import ops

_MODULE = None


def module():
    """The emulation module, or None when this build has none (then the GPU tests skip)."""
    global _MODULE
    if _MODULE is None:
        folder = os.environ.get("BATCHLLM_CUDA_EMULATION_DIR")
        if not folder or not os.path.isdir(folder):
            return None
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            _MODULE = importlib.import_module("_cuda_emulation")
        except ImportError:
            return None
    return _MODULE


def activate(monkeypatch) -> None:
    """For one test: ops' kernel calls go to the emulation, CPU tensors count as CUDA tensors."""
    emulated = module()
    for name in ("store_kv", "prefill_attention", "cascade_decode_attention", "merge_states",
                 "cascade_workspace_floats", "cascade_suffix_split", "cascade_prefix_split",
                 "cuda_kernel_head_dims", "cuda_tile_kernel", "sample_rows",
                 "rms_norm", "silu_and_mul", "rotary_embedding"):
        monkeypatch.setattr(ops._C, name, getattr(emulated, name))
    monkeypatch.setattr(ops, "_emulated_cuda", True)


@contextlib.contextmanager
def suspended():
    """The CPU reference path inside an emulated test (e.g. to compare with it)."""
    saved = ops._emulated_cuda
    ops._emulated_cuda = False
    try:
        yield
    finally:
        ops._emulated_cuda = saved
