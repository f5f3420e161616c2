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


# The engine API needs torch (the "engine" extra); it is imported on first use so that the native
# core (planning, build info) stays importable without it.
_LAZY_EXPORTS = {
    "LLM": ".engine",
    "SamplingParams": ".sampling_params",  # no torch needed
    "RequestOutput": ".outputs",
    "CompletionOutput": ".outputs",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_info", "cuda_available", "cuda_device_count", "__version__", "LLM", "SamplingParams",
           "RequestOutput", "CompletionOutput"]
