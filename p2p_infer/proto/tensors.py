"""Tensors on the wire: ``{"dtype", "shape", "data"}`` with raw little-endian bytes, never pickle.

Checking a wire tensor tests the dtype against an allow-list, the byte count against the
shape, a size limit, and (for floats) that every value is finite, before any computation
sees the data. Sans-IO and torch-free (numpy); ``ml/tensors.py`` converts to torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import BadTensor, BatchTooLarge

WireTensor = dict[str, Any]
ALLOWED_DTYPES = ("float32", "int64")
DEFAULT_MAX_TENSOR_BYTES = 4 * 1024 * 1024
MAX_DIMS = 4
# Inputs in one batched request (dimension 0 of a hidden state). The byte limit above still
# bounds the tensor, so a long-sequence batch meets that limit first (protocols/forward.md).
DEFAULT_MAX_BATCH = 32


def wire_array(obj: object, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, field: str = "tensor") -> np.ndarray:
    """The checked array a wire tensor holds (read-only, no copy); BadTensor names the flaw."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise BadTensor(f"{field} must be a map with exactly dtype, shape and data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise BadTensor(f"{field}: dtype {dtype!r} not allowed; allowed: {list(ALLOWED_DTYPES)}")
    if not _valid_shape(shape):
        raise BadTensor(f"{field}: shape must be 1 to {MAX_DIMS} positive integers, got {shape!r}")
    if not isinstance(data, bytes):
        raise BadTensor(f"{field}: data must be bytes")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if expected > max_bytes:
        raise BadTensor(f"{field}: {expected} bytes exceeds the {max_bytes}-byte limit")
    if len(data) != expected:
        raise BadTensor(f"{field}: shape {shape} {dtype} needs {expected} bytes, got {len(data)}")
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
        raise BadTensor(f"{field}: contains NaN or infinite values")
    return array


def check_wire_tensor(obj: object, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, field: str = "tensor") -> WireTensor:
    wire_array(obj, max_bytes=max_bytes, field=field)
    assert isinstance(obj, dict)
    return obj


def check_batch(batch: int, *, max_batch: int = DEFAULT_MAX_BATCH, field: str = "hidden") -> None:
    """BatchTooLarge unless ``1 <= batch <= max_batch``."""
    if batch > max_batch:
        raise BatchTooLarge(f"{field}: batch of {batch} exceeds the limit of {max_batch} inputs per request")
    if batch < 1:
        raise BadTensor(f"{field}: batch must be at least 1, got {batch}")


def array_to_wire(array: np.ndarray) -> WireTensor:
    name = str(array.dtype)
    if name not in ALLOWED_DTYPES:
        raise BadTensor(f"dtype {name} cannot be sent; allowed: {list(ALLOWED_DTYPES)}")
    return {"dtype": name, "shape": list(array.shape), "data": np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()}


def _valid_shape(shape: object) -> bool:
    return (isinstance(shape, list) and 0 < len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 < d for d in shape))  # bool is an int: refuse True
