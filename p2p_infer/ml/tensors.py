"""torch <-> wire tensors: the only place torch meets the wire format of ``proto/tensors.py``.
torch is imported on the first decode, so a peer that serves no layers never loads it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BadTensor
from ..proto.tensors import ALLOWED_DTYPES, DEFAULT_MAX_TENSOR_BYTES, WireTensor, wire_array

if TYPE_CHECKING:
    import torch

__all__ = ["activation_from_wire", "activation_to_wire", "ALLOWED_DTYPES", "DEFAULT_MAX_TENSOR_BYTES", "WireTensor", "decode_tensor", "encode_tensor", "encode_optional", "decode_optional"]


def encode_tensor(t: torch.Tensor) -> WireTensor:
    name = str(t.dtype).removeprefix("torch.")
    if name not in ALLOWED_DTYPES:
        raise BadTensor(f"dtype {name} cannot be sent; allowed: {list(ALLOWED_DTYPES)}")
    t = t.detach().contiguous().cpu()
    return {"dtype": name, "shape": list(t.shape), "data": t.numpy().tobytes()}


def decode_tensor(obj: object, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, field: str = "tensor") -> torch.Tensor:
    import torch

    return torch.from_numpy(wire_array(obj, max_bytes=max_bytes, field=field).copy())


def encode_optional(t: torch.Tensor | None) -> WireTensor | None:
    return None if t is None else encode_tensor(t)


def decode_optional(obj: Any, *, field: str = "tensor") -> torch.Tensor | None:
    return None if obj is None else decode_tensor(obj, field=field)


def activation_to_wire(act: Any) -> tuple[WireTensor, WireTensor | None]:
    """An :class:`~p2p_infer.ml.models.Activation` as the wire's (hidden, mask)."""
    return encode_tensor(act.hidden), encode_optional(act.mask)


def activation_from_wire(hidden: WireTensor, mask: WireTensor | None) -> Any:
    from .models import Activation

    return Activation(decode_tensor(hidden, field="hidden"), decode_optional(mask, field="mask"))
