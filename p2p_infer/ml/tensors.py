"""Tensors on the wire: ``{"dtype", "shape", "data"}`` with raw little-endian bytes, never pickle.

Decoding checks the dtype against an allow-list, the byte count against the shape, a size
limit, and (for floats) that every value is finite, before any computation sees the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import BadTensor

ALLOWED_DTYPES = {"float32": torch.float32, "int64": torch.int64}
DEFAULT_MAX_TENSOR_BYTES = 4 * 1024 * 1024


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    name = str(t.dtype).removeprefix("torch.")
    if name not in ALLOWED_DTYPES:
        raise BadTensor(f"dtype {name} cannot be sent; allowed: {sorted(ALLOWED_DTYPES)}")
    t = t.detach().contiguous().cpu()
    return {"dtype": name, "shape": list(t.shape), "data": t.numpy().tobytes()}


def decode_tensor(obj: object, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, field: str = "tensor") -> torch.Tensor:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise BadTensor(f"{field} must be a map with exactly dtype, shape and data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in ALLOWED_DTYPES:
        raise BadTensor(f"{field}: dtype {dtype!r} not allowed; allowed: {sorted(ALLOWED_DTYPES)}")
    if not (isinstance(shape, list) and 0 < len(shape) <= 4 and all(isinstance(d, int) and 0 < d for d in shape)):
        raise BadTensor(f"{field}: shape must be 1 to 4 positive integers, got {shape!r}")
    if not isinstance(data, bytes):
        raise BadTensor(f"{field}: data must be bytes")
    itemsize = torch.empty((), dtype=ALLOWED_DTYPES[dtype]).element_size()
    expected = math.prod(shape) * itemsize
    if expected > max_bytes:
        raise BadTensor(f"{field}: {expected} bytes exceeds the {max_bytes}-byte limit")
    if len(data) != expected:
        raise BadTensor(f"{field}: shape {shape} {dtype} needs {expected} bytes, got {len(data)}")
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    tensor = torch.from_numpy(array.copy())
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BadTensor(f"{field}: contains NaN or infinite values")
    return tensor
