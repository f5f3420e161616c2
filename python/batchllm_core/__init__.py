"""batchllm: offline LLM batch inference that plans the whole job and computes every shared prefix once.

The native core lives in the private module ``batchllm_core._C``; this package is its public face.
"""
from __future__ import annotations

from . import _C
from ._C import build_info, cuda_device_count

__version__ = build_info()["version"]


def cuda_available() -> bool:
    """Whether a CUDA device can be used now: CUDA compiled in, a driver and at least one device."""
    return bool(build_info()["cuda"]) and cuda_device_count() > 0


__all__ = ["build_info", "cuda_available", "cuda_device_count", "__version__"]
