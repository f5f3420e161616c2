"""Shared pytest helpers.

``requires_gpu`` is the marker pair for tests that need a usable CUDA device: it marks the test
``gpu`` (select with ``-m gpu``) and skips it with a reason when batchllm has no CUDA build, no
driver or no device. Use it as a decorator or in ``pytestmark``::

    from conftest import requires_gpu
    pytestmark = requires_gpu
"""
from __future__ import annotations

import pytest

import batchllm_core


def _gpu_skip_reason() -> str:
    info = batchllm_core.build_info()
    if not info["cuda"]:
        return "batchllm was built without CUDA kernels"
    return "no usable CUDA device (driver or GPU missing)"


GPU_AVAILABLE = batchllm_core.cuda_available()

requires_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPU_AVAILABLE, reason=_gpu_skip_reason() if not GPU_AVAILABLE else ""),
]


def gpu(test):
    """Decorator form of :data:`requires_gpu`."""
    for mark in requires_gpu:
        test = mark(test)
    return test
