"""Step metadata in device buffers at fixed addresses, filled by one host-to-device copy.

A :class:`PackedLayout` lays out named int arrays of fixed shapes in one byte buffer (each field
16-byte aligned). A :class:`StaticUpload` owns a device buffer with that layout plus a host staging
buffer of the same layout (pinned on CUDA): :meth:`StaticUpload.upload` writes the step's arrays
into the staging buffer and issues a single asynchronous copy. The device views never move, so a
CUDA graph captured over them reads each step's metadata on replay (cuda_graphs.py).

The host buffer is reused: before overwriting it, ``upload`` waits for the previous copy out of it
(recorded with an event), which has normally finished long before.

Example
-------
>>> import numpy as np, torch
>>> layout = PackedLayout([("ids", np.int32, (4,)), ("slots", np.int64, (4,))])
>>> upload = StaticUpload(layout, torch.device("cpu"))
>>> views = upload.upload({"ids": np.arange(4, dtype=np.int32), "slots": np.full(4, -1)})
>>> views["ids"].tolist(), views["slots"].dtype
([0, 1, 2, 3], torch.int64)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Tuple

import numpy as np
import torch

_ALIGN_BYTES = 16
_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float32): torch.float32}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    offset: int
    nbytes: int = field(init=False)  # computed once: upload() reads it for every field of every step

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize)


class PackedLayout:
    """Named arrays of fixed dtype and shape at 16-byte aligned offsets of one byte buffer.

    Parameters
    ----------
    fields : iterable of (name, dtype, shape)
    """

    def __init__(self, fields: Iterable[Tuple[str, object, Tuple[int, ...]]]):
        self.fields: Dict[str, FieldSpec] = {}
        offset = 0
        for name, dtype, shape in fields:
            dtype = np.dtype(dtype)
            if dtype not in _TORCH_DTYPES:
                raise ValueError(f"PackedLayout: field {name!r} has unsupported dtype {dtype}")
            if name in self.fields:
                raise ValueError(f"PackedLayout: field {name!r} given twice")
            spec = FieldSpec(name, dtype, tuple(int(s) for s in shape), offset)
            self.fields[name] = spec
            offset += -(-spec.nbytes // _ALIGN_BYTES) * _ALIGN_BYTES
        self.nbytes = max(offset, _ALIGN_BYTES)

    def views(self, buffer: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Typed views of a uint8 ``buffer`` of ``nbytes``, one per field."""
        return {spec.name: buffer[spec.offset:spec.offset + spec.nbytes].view(_TORCH_DTYPES[spec.dtype])
                .view(spec.shape) for spec in self.fields.values()}


class StaticUpload:
    """A device buffer of ``layout`` (fixed addresses) and its host staging buffer.

    Parameters
    ----------
    layout : PackedLayout
    device : torch.device
        On CUDA the staging buffer is pinned and the copy asynchronous on the current stream; on
        CPU the "device" buffer is ordinary memory and the copy a memcpy.

    Attributes
    ----------
    device_views : dict of str -> torch.Tensor
        Views of the device buffer, valid for the object's lifetime.
    """

    def __init__(self, layout: PackedLayout, device: torch.device):
        self.layout = layout
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(layout.nbytes, dtype=torch.uint8, pin_memory=cuda)
        self._host_bytes = self._host.numpy()
        self._device = torch.zeros(layout.nbytes, dtype=torch.uint8, device=self.device)
        self.device_views = layout.views(self._device)
        self._copied = None  # torch.cuda.Event of the last copy out of the staging buffer

    def upload(self, arrays: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        """Copy one step's arrays (each exactly its field's shape; castable to its dtype) to the device.

        Returns the device views (the same tensors every call). The copy is ordered on the current
        stream before any work queued after this call.
        """
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy may still read the staging buffer
        for name, spec in self.layout.fields.items():
            values = np.asarray(arrays[name])
            if values.shape != spec.shape:
                raise ValueError(f"StaticUpload: field {name!r} has shape {values.shape}, layout says {spec.shape}")
            target = self._host_bytes[spec.offset:spec.offset + spec.nbytes].view(spec.dtype).reshape(spec.shape)
            np.copyto(target, values, casting="same_kind")
        if self.device.type == "cuda":
            self._device.copy_(self._host, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._device.copy_(self._host)
        return self.device_views


def to_device_async(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the work queued there.

    A plain ``torch.as_tensor(values, device="cuda")`` copies from pageable memory and synchronises
    the stream, so the host would wait for the step it just queued; here the array goes through a
    pinned buffer (torch's caching host allocator keeps it until the copy is done). CPU: no copy
    when the array allows one.
    """
    values = np.ascontiguousarray(values)
    if device.type != "cuda":
        return torch.as_tensor(values)
    return torch.from_numpy(values).pin_memory().to(device, non_blocking=True)
