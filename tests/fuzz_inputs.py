"""Hypothesis strategies for the fuzz suite: whole frames (length prefix + payload) for each
p2p-infer protocol, structured and random. Categories (issue 10): truncation, huge length
prefixes, deep nesting, declared-length bombs, wrong types, NaN/inf, giant shapes."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import msgpack
import numpy as np
from hypothesis import strategies as st

MAX_FRAME = 8 * 1024 * 1024
DIGITS_HIDDEN = 32  # digits-mlp's hidden width (the fuzzed peer serves digits-mlp:1-3)


@dataclass(frozen=True)
class Probe:
    category: str
    frame: bytes
    close_after: bool = False  # end our side of the stream after writing (truncation)


def frame_of(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def pack(message: object) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


# ---- values of every wire type, nested a little ----

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=64),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _floats(n: int, special: str | None) -> bytes:
    data = np.random.default_rng(n).standard_normal(n).astype("<f4")
    if special is not None and n:
        data[n // 2] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[special]
    return data.tobytes()


@st.composite
def tensors(draw: st.DrawFn) -> object:
    """Mostly tensor-shaped maps with one thing wrong (or nothing), sometimes anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    dtype = draw(st.one_of(st.sampled_from(["float32", "int64", "float16", "float64", "", "<f4"]),
                           st.just(["float32"]), st.just({"float32": 1}), scalars))
    shape = draw(st.one_of(
        st.just([1, DIGITS_HIDDEN]),
        st.lists(st.integers(-3, 2**31), min_size=0, max_size=6),
        st.lists(st.sampled_from([True, False, 1.0, None, "1", [1], 2**63, 2**64 - 1]), min_size=1, max_size=3),
        st.just([2**40, 2**40, 2**40]),  # a giant shape with no data
        values,
    ))
    n = math.prod(shape) if isinstance(shape, list) and all(type(d) is int and 0 < d < 4096 for d in shape) and shape else 0
    special = draw(st.sampled_from([None, None, "nan", "inf", "-inf"]))
    data = draw(st.one_of(st.just(_floats(min(n, 4096), special)), st.binary(max_size=300), scalars))
    tensor = {"dtype": dtype, "shape": shape, "data": data}
    extra = draw(st.sampled_from(["none", "drop", "add"]))
    if extra == "drop":
        tensor.pop(draw(st.sampled_from(sorted(tensor))))
    elif extra == "add":
        tensor[draw(st.text(max_size=6))] = draw(scalars)
    return tensor


def mutate(draw: st.DrawFn, message: dict) -> dict:
    """Change, drop or add a few fields of a well-formed message."""
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "tensor", "drop", "add"]))
        key = draw(st.sampled_from(sorted(message)))
        if action == "set":
            message[key] = draw(values)
        elif action == "tensor":
            message[key] = draw(tensors())
        elif action == "drop" and key != "type":
            message.pop(key)
        else:
            message[draw(st.text(max_size=10))] = draw(values)
    return message


@st.composite
def forward_messages(draw: st.DrawFn, model_id: str) -> dict:
    good = {"type": "forward", "model": model_id, "first": 1, "last": 3, "session": "", "request_id": "fuzz",
            "hidden": {"dtype": "float32", "shape": [1, DIGITS_HIDDEN], "data": _floats(DIGITS_HIDDEN, None)},
            "mask": None, "route": [], "reply_to": "", "reply_addrs": [], "trace": [], "prove": False}
    kind = draw(st.sampled_from(["forward"] * 6 + ["ping", "get_proof", "forward_result", "teleport"]))
    if kind != "forward":
        return mutate(draw, {"type": kind, "token": draw(values)})
    good["first"], good["last"] = draw(st.sampled_from([(1, 3), (1, 1), (0, 3), (3, 1), (2, 9), (-1, 2), (True, True)]))
    good["route"] = draw(st.one_of(st.just([]), st.lists(st.fixed_dictionaries(
        {"peer": st.text(max_size=60), "addrs": st.lists(st.text(max_size=300), max_size=20),
         "first": st.integers(-2, 9), "last": st.integers(-2, 9)}), max_size=40), values))
    good["prove"] = draw(st.sampled_from([False, True, "follow", "x", 2]))
    return mutate(draw, good)


@st.composite
def committee_messages(draw: st.DrawFn, model_id: str, candidates: list) -> dict:
    """``candidates``: a well-formed candidate set's wire form (signed, but not for this peer)."""
    kind = draw(st.sampled_from(["ticket", "execute", "execute", "execute", "reveal", "commit", "nope"]))
    if kind == "ticket":
        good = {"type": "ticket", "seed": draw(st.binary(min_size=30, max_size=34)), "model": model_id, "first": 1, "last": 3}
    elif kind == "execute":
        wire = list(candidates)
        if draw(st.booleans()):
            wire[draw(st.integers(0, len(wire) - 1))] = draw(values)
        good = {"type": "execute", "candidates": draw(st.one_of(st.just(wire), values)), "mask": None,
                "hidden": {"dtype": "float32", "shape": [1, DIGITS_HIDDEN], "data": _floats(DIGITS_HIDDEN, None)}}
    else:
        good = {"type": kind, "task_id": draw(st.binary(max_size=40))}
    return mutate(draw, good)


@st.composite
def artifact_messages(draw: st.DrawFn) -> dict:
    sha = draw(st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), values))
    return mutate(draw, {"type": draw(st.sampled_from(["artifact", "artifact", "artifact", "ping"])), "sha256": sha})


@st.composite
def result_messages(draw: st.DrawFn) -> dict:
    good = {"type": draw(st.sampled_from(["forward_result", "forward_failed", "ok"])), "request_id": draw(st.text(max_size=40)),
            "hidden": draw(tensors()), "timing": draw(values), "trace": draw(values), "code": "x", "at": "y"}
    return mutate(draw, good)


def nested(depth: int, container: int) -> bytes:
    return bytes([container]) * depth + b"\xc0"


@st.composite
def raw_frames(draw: st.DrawFn) -> Probe:
    """The categories that are not one structured message."""
    category = draw(st.sampled_from(["random", "huge_prefix", "short_frame", "deep_nesting", "length_bomb", "not_a_map"]))
    if category == "random":
        return Probe(category, frame_of(draw(st.binary(max_size=512))))
    if category == "huge_prefix":  # over the limit: refused before reading
        return Probe(category, draw(st.integers(MAX_FRAME + 1, 2**32 - 1)).to_bytes(4, "big") + draw(st.binary(max_size=16)))
    if category == "short_frame":  # a frame that announces more than it sends, then the stream ends
        length = draw(st.integers(1, MAX_FRAME))
        return Probe(category, length.to_bytes(4, "big") + draw(st.binary(max_size=min(length - 1, 256))), close_after=True)
    if category == "deep_nesting":
        return Probe(category, frame_of(b"\x81\xa4type" + nested(draw(st.integers(1, 5000)), draw(st.sampled_from([0x91, 0x81])))))
    if category == "length_bomb":  # msgpack headers declaring far more than follows
        head = draw(st.sampled_from([b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9\x00"]))
        declared = struct.pack(">I", draw(st.integers(2**20, 2**32 - 1)))
        return Probe(category, frame_of(b"\x82\xa4type\xa7forward\xa6hidden" + head + declared + draw(st.binary(max_size=32))))
    return Probe(category, frame_of(pack(draw(values))))


def probes(messages: st.SearchStrategy[dict]) -> st.SearchStrategy[Probe]:
    structured = messages.map(lambda m: Probe("structured", frame_of(pack(m))))

    @st.composite
    def truncated(draw: st.DrawFn) -> Probe:
        frame = frame_of(pack(draw(messages)))
        return Probe("truncated", frame[: draw(st.integers(1, len(frame) - 1))], close_after=True)

    # six in ten structured, two truncated, two of the raw categories
    return st.integers(0, 9).flatmap(lambda i: structured if i < 6 else truncated() if i < 8 else raw_frames())
