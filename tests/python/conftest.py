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


# Kernel variants (the A/B candidates a GPU run picks the defaults from) run after the default
# kernels, the newest last: a fault on a real GPU is sticky, and every test after it fails too, so
# the default kernels' results must not depend on a variant's fate. Order within each rank is kept.
_VARIANT_RANKS = {"wgmma": 2, "wgmma-pipe": 3, "wgmma64": 4, "staged": 5, "wgmma-k128": 6}


def _variant_rank(item) -> int:
    params = getattr(getattr(item, "callspec", None), "params", {})
    rank = 0
    for name in ("tiles", "kernels"):
        value = params.get(name)
        if isinstance(value, dict):
            value = "+".join(value.values())
        if not isinstance(value, str) or value in ("wmma", "decode+wmma", ""):
            continue
        rank = max(rank, *(_VARIANT_RANKS.get(part, 1) for part in value.split("+")))
    return rank


def pytest_collection_modifyitems(session, config, items):
    items[:] = [item for _, item in sorted(enumerate(items), key=lambda pair: (_variant_rank(pair[1]), pair[0]))]
