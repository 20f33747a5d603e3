"""The forward protocol (``/p2p-infer/forward/1.0.0``): message schemas and their checks.

Sans-IO and torch-free: these functions build and parse messages whose tensors are wire
tensors (``proto/tensors.py``); the peer's handler and the client do the I/O and the
torch conversion (``ml/tensors.py``). ``protocols/forward.md`` is the normative description.

Request ``forward``: model id, layer range, session and request ids, the hidden state and
its mask, and optionally ``route``: the hops after this one, for peer-to-peer forwarding
(each hop is ``{peer, addrs, first, last}``; the last hop returns the result to
``reply_to`` instead of to the sender), and optionally ``commit`` (optimistic mode: a task id
and client nonce; the reply then carries the executor's signed commitment,
``proto/optimistic.py``). Both fields are additive: a request without them is answered as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import BadCommitment, ProtocolViolation
from .optimistic import CommitRequest, ForwardCommitment
from .tensors import DEFAULT_MAX_TENSOR_BYTES, WireTensor, check_wire_tensor
from .wire import FORWARD, FORWARD_PROTOCOL, FORWARD_RESULT, Message, expect, expect_reply
MAX_ROUTE_HOPS = 32
# Addresses in a request are never dialled (peers dial only verified records' addresses),
# but they are parsed and forwarded, so their number and size are bounded.
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_ID_CHARS = 128


@dataclass(frozen=True)
class Hop:
    peer: str
    addrs: tuple[str, ...]
    first: int
    last: int

    def to_wire(self) -> dict[str, Any]:
        return {"peer": self.peer, "addrs": list(self.addrs), "first": self.first, "last": self.last}


@dataclass
class ForwardRequest:
    model_id: str
    first: int
    last: int
    hidden: WireTensor
    mask: WireTensor | None = None
    session: str = ""
    request_id: str = ""
    route: list[Hop] = field(default_factory=list)  # hops after this one (forwarding mode)
    reply_to: str = ""  # client peer id the last hop sends the result to
    reply_addrs: tuple[str, ...] = ()  # where to dial the client if not connected
    trace: list[dict[str, Any]] = field(default_factory=list)  # timings of earlier hops
    prove: bool | str = False  # critical mode: True = proof in the reply; "follow" = fetch it later
    commit: CommitRequest | None = None  # optimistic mode: sign a commitment to the reply

    def to_wire(self) -> Message:
        message = {
            "type": FORWARD,
            "model": self.model_id,
            "first": self.first,
            "last": self.last,
            "session": self.session,
            "request_id": self.request_id,
            "hidden": self.hidden,
            "mask": self.mask,
            "route": [h.to_wire() for h in self.route],
            "reply_to": self.reply_to,
            "reply_addrs": list(self.reply_addrs),
            "trace": self.trace,
            "prove": self.prove,
        }
        if self.commit is not None:  # only when asked: plain requests stay byte-identical
            message["commit"] = self.commit.to_wire()
        return message


def parse_forward_request(message: Message, *, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> ForwardRequest:
    if expect(FORWARD_PROTOCOL, message) != FORWARD:
        raise ProtocolViolation(f"expected forward, got {message.get('type')!r}")
    model, first, last = message.get("model"), message.get("first"), message.get("last")
    if not isinstance(model, str) or not model:
        raise ProtocolViolation("forward: 'model' must be a model id string")
    if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last):
        raise ProtocolViolation("forward: 'first' and 'last' must be integers with 0 <= first <= last")
    hidden = check_wire_tensor(message.get("hidden"), max_bytes=max_tensor_bytes, field="hidden")
    raw_mask = message.get("mask")
    mask = None if raw_mask is None else check_wire_tensor(raw_mask, max_bytes=max_tensor_bytes, field="mask")
    commit = _parse_commit(message.get("commit"))
    route_raw = message.get("route") or []
    if not isinstance(route_raw, list) or len(route_raw) > MAX_ROUTE_HOPS:
        raise ProtocolViolation(f"forward: 'route' must be a list of at most {MAX_ROUTE_HOPS} hops")
    return ForwardRequest(
        model_id=model,
        first=first,
        last=last,
        hidden=hidden,
        mask=mask,
        session=_short_str(message.get("session"), "session"),
        request_id=_short_str(message.get("request_id"), "request_id"),
        route=[_parse_hop(h) for h in route_raw],
        reply_to=_short_str(message.get("reply_to"), "reply_to"),
        reply_addrs=_str_list(message.get("reply_addrs"), "reply_addrs"),
        trace=_parse_trace(message.get("trace")),
        prove=_parse_prove(message.get("prove", False)),
        commit=commit,
    )


def _parse_commit(value: object) -> CommitRequest | None:
    if value is None:
        return None
    try:
        return CommitRequest.from_wire(value)
    except BadCommitment as exc:
        raise ProtocolViolation(exc.message) from None


def _parse_prove(value: object) -> bool | str:
    if value in (None, False, True, "follow"):
        return bool(value) if value != "follow" else "follow"
    raise ProtocolViolation("forward: 'prove' must be false, true or \"follow\"")


def _str_list(value: object, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not _addr_list(value):
        raise ProtocolViolation(f"forward: '{name}' must be a list of at most {MAX_ADDRS} strings of at most {MAX_ADDR_CHARS} characters")
    assert isinstance(value, list)
    return tuple(value)


def _addr_list(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_ADDRS and all(isinstance(v, str) and len(v) <= MAX_ADDR_CHARS for v in value)


def _parse_trace(value: object) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ROUTE_HOPS or not all(isinstance(v, dict) for v in value):
        raise ProtocolViolation("forward: 'trace' must be a list of maps")
    return value


def _short_str(value: object, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 128:
        raise ProtocolViolation(f"forward: '{name}' must be a string of at most 128 characters")
    return value


def _parse_hop(raw: object) -> Hop:
    ok = (
        isinstance(raw, dict)
        and isinstance(raw.get("peer"), str)
        and 0 < len(raw["peer"]) <= MAX_ID_CHARS
        and _addr_list(raw.get("addrs", []))
        and isinstance(raw.get("first"), int)
        and isinstance(raw.get("last"), int)
        and 0 <= raw["first"] <= raw["last"]
    )
    if not ok:
        raise ProtocolViolation(f"forward: each route hop must be {{peer, addrs (at most {MAX_ADDRS}), first, last}}")
    assert isinstance(raw, dict)
    return Hop(raw["peer"], tuple(raw.get("addrs", [])), raw["first"], raw["last"])


def forward_reply(hidden: WireTensor, compute_ms: float, queue_ms: float, request_id: str = "",
                  commitment: ForwardCommitment | None = None) -> Message:
    reply: Message = {
        "type": FORWARD_RESULT,
        "request_id": request_id,
        "hidden": hidden,
        "timing": {"compute_ms": compute_ms, "queue_ms": queue_ms},
    }
    if commitment is not None:
        reply["commitment"] = commitment.to_wire()
    return reply


def parse_commitment(message: Message) -> ForwardCommitment:
    """The signed commitment of a reply to a request that carried ``commit`` (BadCommitment if absent)."""
    raw = message.get("commitment")
    if raw is None:
        raise BadCommitment("forward_result: no 'commitment' although the request asked for one")
    return ForwardCommitment.from_wire(raw)


def parse_forward_reply(message: Message, *, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> tuple[WireTensor, dict[str, float]]:
    expect_reply(message, FORWARD_RESULT)
    timing = message.get("timing") or {}
    if not isinstance(timing, dict):
        raise ProtocolViolation("forward_result: 'timing' must be a map")
    hidden = check_wire_tensor(message.get("hidden"), max_bytes=max_tensor_bytes, field="hidden")
    return hidden, {str(k): float(v) for k, v in timing.items() if isinstance(v, (int, float))}
