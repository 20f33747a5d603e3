"""The client's generation machine: which peer holds each span's session, what each step
sends, failover with replay, and the verification of a finished generation. Sans-IO: hidden
states are wire tensors (float32 [1, T, H]) handled with numpy; the driver
(``node/generate.py``) sends the requests this machine builds and feeds the replies back.

Per span the machine keeps the inputs it has sent and the outputs it used (float32
[n, H]); so when a span's peer dies or misbehaves mid-generation, a replacement that serves
the whole span is opened and sent the span's whole history plus the current step in one
prefill (``position`` 0), and generation goes on where it was: the tokens equal an
uninterrupted run's (the replayed cache equals the lost one to float rounding).

Verification (docs/generation.md): each step's output comes with the peer's signed
commitment to a digest of it (:func:`output_digest`); before the answer is final another
provider of each span re-executes the span's whole input history in one stateless prefill,
and every row must agree with the outputs the client used within :data:`TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ..errors import ForwardIncomplete, NoRoute, ProtocolViolation
from ..identity import peer_id_from_public_key, verify_signature
from .routing import Server, plan_route
from .session import Hop, LinkRequest, OpenRequest, StepRequest, parse_output
from .tensors import WireTensor, wire_array

DIGEST_K = 8  # entries per token in a step's digest (TOPLOC-style: the largest magnitudes)
# |a - b| <= ATOL + RTOL * |b|, elementwise. Honest re-execution differs from incremental decode
# only by float32 summation order (measured ~1e-5 relative, docs/generation.md); a lie that
# changes any token's output by more than ~0.1% of its scale is caught.
TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}
# a forwarded step's reply carries every hop's output rows: longer steps (a long prompt's
# prefill, a replay) go hop by hop instead, inside the 8 MiB frame
FORWARD_MAX_BYTES = 4 * 1024 * 1024


def to_wire(array: np.ndarray) -> WireTensor:
    a = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": [1, *a.shape], "data": a.tobytes()}


def rows(tensor: WireTensor) -> np.ndarray:
    """A float32 [1, T, H] wire tensor as a [T, H] array (checked)."""
    return np.array(wire_array(tensor, field="hidden")[0], dtype=np.float32)


def agree(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= TOLERANCE["atol"] + TOLERANCE["rtol"] * np.abs(b)))


def output_digest(out: np.ndarray) -> dict[str, Any]:
    """Per token: the indices of the ``DIGEST_K`` largest-magnitude entries and their values."""
    idx = np.argsort(-np.abs(out), axis=1, kind="stable")[:, :DIGEST_K]
    return {"indices": idx.astype("<i4").tobytes(), "values": np.take_along_axis(out, idx, 1).astype("<f4").tobytes(), "k": DIGEST_K}


def rows_hash(array: np.ndarray) -> bytes:
    """sha256 of rows as sent: float32 little-endian, row-major (a wire tensor's ``data``)."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).digest()


def commitment_bytes(peer: str, session: str, step: int, position: int, digest: dict[str, Any],
                     input_hash: bytes, output_hash: bytes) -> bytes:
    """What a peer signs for one step: domain, its id, the step's place, the digest and the
    hashes of the exact input and output rows (so a relayed output cannot be altered on the way
    back in forwarded mode without breaking its producer's signature)."""
    return b"p2p-infer/session-commit/2\0" + hashlib.sha256(msgpack.packb(
        [peer, session, step, position, digest["k"], digest["indices"], digest["values"], input_hash, output_hash],
        use_bin_type=True)).digest()


def signed_commitment(identity: Any, session: str, step: int, position: int, inputs: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """The serving peer's side: digest of a step's output rows, signed with its key."""
    digest = output_digest(out)
    signed = commitment_bytes(identity.peer_id, session, step, position, digest, rows_hash(inputs), rows_hash(out))
    return {"digest": digest, "public_key": identity.public_key, "signature": identity.sign(signed)}


def check_commitment(commitment: Any, peer: str, step: StepRequest, inputs: np.ndarray, out: np.ndarray) -> None:
    """The client's side: signed by ``peer``'s own key, for this step, these input rows and
    exactly these output rows, with a digest that fits them."""
    if not isinstance(commitment, dict) or not isinstance(commitment.get("digest"), dict):
        raise ProtocolViolation(f"{peer[:16]}...: session_output carries no commitment")
    key, signature, digest = commitment.get("public_key"), commitment.get("signature"), commitment["digest"]
    if not isinstance(key, bytes) or not isinstance(signature, bytes) or peer_id_from_public_key(key) != peer:
        raise ProtocolViolation(f"{peer[:16]}...: commitment not made with the peer's own key")
    try:
        signed = commitment_bytes(peer, step.session, step.step, step.position, digest, rows_hash(inputs), rows_hash(out))
    except (KeyError, TypeError, ValueError):
        raise ProtocolViolation(f"{peer[:16]}...: malformed commitment digest") from None
    if not verify_signature(key, signed, signature):
        raise ProtocolViolation(f"{peer[:16]}...: commitment signature does not verify (input, output or step differ)")
    if not digest_matches(digest, out):
        raise ProtocolViolation(f"{peer[:16]}...: committed digest does not fit the output sent")


def digest_matches(digest: dict[str, Any], out: np.ndarray) -> bool:
    """Whether ``out`` (the rows a step returned, or their re-execution) fits a committed digest."""
    try:
        k = int(digest["k"])
        idx = np.frombuffer(digest["indices"], dtype="<i4").reshape(out.shape[0], k)
        values = np.frombuffer(digest["values"], dtype="<f4").reshape(out.shape[0], k)
    except (KeyError, TypeError, ValueError):
        return False
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= out.shape[1]:
        return False
    return agree(np.take_along_axis(out, idx.astype(np.int64), 1), values)


@dataclass
class Slot:
    """One span of the route and the session holding its cache."""

    first: int
    last: int
    peer: str
    session: str
    hidden: int
    inputs: np.ndarray = field(init=False)  # every input row sent and answered
    outputs: np.ndarray = field(init=False)  # the output rows the client used
    producers: list[str] = field(default_factory=list)  # per row: the peer whose output it is
    commitments: list[dict[str, Any]] = field(default_factory=list)
    opened: bool = False
    cached: int = 0  # rows in the peer's cache
    step: int = 0  # the peer session's next step number
    linked: str | None = None  # the upstream peer this session was told (forwarded mode)
    # re-split after a failure: the outputs so far are rebuilt from this slot's replay, and a
    # later part of the split learns its input history from the part before it
    rebuild: bool = False
    awaiting_inputs: bool = False

    def __post_init__(self) -> None:
        self.inputs = np.zeros((0, self.hidden), dtype=np.float32)
        self.outputs = np.zeros((0, self.hidden), dtype=np.float32)


@dataclass
class StepPlan:
    slot: int
    peer: str
    open: OpenRequest | None
    step: StepRequest
    new_rows: int  # the rows of this token (the rest is replayed history)


@dataclass
class ForwardPlan:
    """One token through the whole route, passed peer to peer: ``step`` goes to the first
    hop; the last hop sends the output to the client under ``request_id``."""

    step: StepRequest
    request_id: str
    first_peer: str
    last_peer: str


class GenerationMachine:
    def __init__(self, model_id: str, num_layers: int, local_layers: int, hidden: int, servers: Collection[Server],
                 rng: random.Random, *, max_length: int, max_retries: int = 3, commit: bool = True,
                 reputation: Callable[[str], float] = lambda _p: 1.0, exclude: Collection[str] = (),
                 avoid: Collection[str] = (), forwarded: bool = False) -> None:
        self.model_id, self.hidden, self.max_length, self.commit = model_id, hidden, max_length, commit
        self.forwarded = forwarded
        self.forwarded_tokens = self.fallbacks = 0
        self.resplits: list[dict[str, Any]] = []
        self.servers = list(servers)
        self.rng = rng
        self.excluded: set[str] = set(exclude)
        self.failures: list[tuple[str, str]] = []  # (peer, reason)
        self.max_retries = max_retries
        route = plan_route(self.servers, local_layers, num_layers - 1, exclude=self.excluded | set(avoid), reputation=reputation)
        self.slots = [Slot(seg.first, seg.last, seg.peer_id, self._session_id(), hidden) for seg in route]

    def _session_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    @property
    def route(self) -> list[dict[str, Any]]:
        return [{"peer": s.peer, "first": s.first, "last": s.last} for s in self.slots]

    def plan_step(self, index: int, hidden: WireTensor) -> StepPlan:
        """The request(s) carrying ``hidden`` (this token's rows) through span ``index``: an
        open and a replay of the history first if the span's peer is new."""
        slot = self.slots[index]
        if slot.awaiting_inputs:
            raise NoRoute(f"layers {slot.first}-{slot.last}: the part before it has not replayed the history yet")
        new = rows(hidden)
        send = np.concatenate([slot.inputs[slot.cached:], new]) if slot.cached < len(slot.inputs) else new
        opening = None if slot.opened else self.opening(index)
        step = StepRequest(slot.session, slot.step, slot.cached, to_wire(send), self.commit)
        return StepPlan(index, slot.peer, opening, step, len(new))

    def _upstream(self, index: int) -> str | None:
        return self.slots[index - 1].peer if self.forwarded and index > 0 else None

    def opening(self, index: int) -> OpenRequest:
        slot = self.slots[index]
        return OpenRequest(slot.session, self.model_id, slot.first, slot.last, self.max_length, self._upstream(index))

    def on_opened(self, plan: StepPlan | int) -> None:
        slot = self.slots[plan if isinstance(plan, int) else plan.slot]
        slot.opened, slot.linked = True, self._upstream(self.slots.index(slot))

    # ---- forwarded decode ----

    def can_forward(self, hidden: WireTensor) -> bool:
        """Whether this token can go peer to peer: forwarded mode, every session open with no
        history left to replay, and the rows small enough to come back in one reply."""
        size = int(hidden["shape"][1]) * self.hidden * 4 * len(self.slots)
        return (self.forwarded and size <= FORWARD_MAX_BYTES
                and all(s.opened and s.cached == len(s.inputs) for s in self.slots))

    def links(self) -> list[tuple[int, LinkRequest]]:
        """Sessions whose upstream peer changed (a failover upstream): tell them before forwarding."""
        return [(i, LinkRequest(s.session, self._upstream(i))) for i, s in enumerate(self.slots)
                if s.opened and s.linked != self._upstream(i)]

    def on_linked(self, index: int) -> None:
        self.slots[index].linked = self._upstream(index)

    def plan_forward(self, hidden: WireTensor) -> ForwardPlan:
        first, rest = self.slots[0], self.slots[1:]
        request_id = f"{self.rng.getrandbits(128):032x}"
        route = tuple(Hop(s.peer, s.session, s.step, s.cached) for s in rest)
        step = StepRequest(first.session, first.step, first.cached, hidden, self.commit, True, route, request_id)
        return ForwardPlan(step, request_id, first.peer, self.slots[-1].peer)

    def on_forwarded(self, plan: ForwardPlan, reply: dict[str, Any], pushed: dict[str, Any] | None) -> WireTensor:
        """Check a forwarded step's reply (every hop's entry, signed when verified, each hop's
        input the previous hop's output) and the last hop's pushed output (None: the reply came
        first, and the logits were computed on its last entry); record every span's
        rows as client-driven steps would. ForwardIncomplete if anything is missing or off."""
        entries, failed = reply.get("hops"), reply.get("failed")
        if isinstance(failed, dict):
            who = failed.get("peer") if isinstance(failed.get("peer"), str) else None
            raise ForwardIncomplete(f"forwarded step failed at {str(who)[:16]}...: {failed.get('code')}: {str(failed.get('message'))[:200]}", who)
        if not isinstance(entries, list) or len(entries) != len(self.slots):
            raise ForwardIncomplete(f"forwarded reply has {len(entries) if isinstance(entries, list) else 'no'} entries for {len(self.slots)} hops")
        inputs, tokens, recorded = rows(plan.step.hidden), plan.step.tokens, []
        for slot, entry in zip(self.slots, entries):
            if not isinstance(entry, dict) or entry.get("peer") != slot.peer:
                raise ForwardIncomplete(f"forwarded reply's entry for layers {slot.first}-{slot.last} is not from {slot.peer[:16]}...")
            step = StepRequest(slot.session, slot.step, slot.cached, to_wire(inputs), self.commit)
            try:
                out = rows(parse_output({**entry, "type": "session_output"}, slot.session, slot.step, tokens, self.hidden))
                if self.commit:
                    check_commitment(entry.get("commitment"), slot.peer, step, inputs, out)
            except (ProtocolViolation, ValueError) as exc:  # BadTensor is a ProtocolViolation too
                raise ForwardIncomplete(f"forwarded entry of {slot.peer[:16]}...: {exc}") from None
            recorded.append((slot, step, entry, inputs, out))
            inputs = out
        if pushed is not None and pushed.get("hidden") != entries[-1].get("hidden"):
            raise ForwardIncomplete("the last hop's pushed output differs from its entry in the reply")
        for slot, step, entry, inp, out in recorded:
            self._record(slot, slot.peer, step, entry.get("commitment"), inp, out)
        self.forwarded_tokens += 1
        return to_wire(inputs)

    def on_forward_failed(self, plan: ForwardPlan, failed: str | None, reason: str) -> str | None:
        """A forwarded token did not complete: any hop may have used its step number (the redo
        takes the next one and rewinds the position); a hop named failed is failed over (its old
        session id returned, to close)."""
        self.fallbacks += 1
        for slot in self.slots:
            slot.step += 1
        index = next((i for i, s in enumerate(self.slots) if s.peer == failed), None)
        if index is None:
            return None
        return self.on_failure(StepPlan(index, failed, None, plan.step, 1), reason)  # type: ignore[arg-type]

    def _record(self, slot: Slot, peer: str, step: StepRequest, commitment: Any, inputs: np.ndarray, out: np.ndarray) -> None:
        if self.commit:
            slot.commitments.append({**commitment, "peer": peer, "session": step.session, "step": step.step, "position": step.position})
        slot.inputs = np.concatenate([slot.inputs, inputs])
        slot.outputs = np.concatenate([slot.outputs, out])
        slot.producers += [peer] * len(out)
        slot.cached, slot.step = len(slot.inputs), step.step + 1

    def on_output(self, plan: StepPlan, reply: dict[str, Any]) -> WireTensor:
        """Record a step's reply; the rows of this token (input of the next span)."""
        slot = self.slots[plan.slot]
        out = rows(parse_output(reply, plan.step.session, plan.step.step, plan.step.tokens, self.hidden))
        sent = rows(plan.step.hidden)
        if self.commit:
            check_commitment(reply.get("commitment"), plan.peer, plan.step, sent, out)
        fresh = out[-plan.new_rows:]
        if slot.rebuild:  # one part of a re-split span: its history's outputs come from this replay
            history = out[:-plan.new_rows]
            slot.outputs, slot.producers, slot.rebuild = history.copy(), [plan.peer] * len(history), False
            after = self.slots[plan.slot + 1] if plan.slot + 1 < len(self.slots) else None
            if after is not None and after.awaiting_inputs:
                after.inputs, after.awaiting_inputs = history.copy(), False
        if self.commit:
            slot.commitments.append({**reply["commitment"], "peer": plan.peer, "session": plan.step.session,
                                     "step": plan.step.step, "position": plan.step.position})
        slot.inputs = np.concatenate([slot.inputs, sent[-plan.new_rows:]])
        slot.outputs = np.concatenate([slot.outputs, fresh])
        slot.producers += [plan.peer] * plan.new_rows
        slot.cached, slot.step = len(slot.inputs), plan.step.step + 1
        return to_wire(fresh)

    def on_failure(self, plan: StepPlan, reason: str) -> str | None:
        """The span's peer failed: exclude it and move the span to a replacement serving the
        whole span (history replayed at the next :meth:`plan_step`). The old session id,
        to close best-effort; NoRoute when no replacement or retry is left."""
        slot = self.slots[plan.slot]
        self.failures.append((slot.peer, reason))
        self.excluded.add(slot.peer)
        if len(self.failures) > self.max_retries:
            raise NoRoute(f"generation failed over {len(self.failures)} times; last: {reason}")
        replacement = self.provider(slot.first, slot.last, self.excluded)
        if replacement is None:
            self._resplit(plan.slot, reason)
            return slot.session
        old = slot.session
        slot.peer, slot.session, slot.opened, slot.cached, slot.step, slot.linked = replacement, self._session_id(), False, 0, 0, None
        return old

    def _resplit(self, index: int, reason: str) -> None:
        """No one peer serves the failed span any more: run it on a chain of peers whose ranges
        cover it (the cheapest, as routing plans), each part replayed in turn."""
        slot = self.slots[index]
        try:
            chain = plan_route(self.servers, slot.first, slot.last, exclude=self.excluded)
        except NoRoute:
            raise NoRoute(f"no replacement serves layers {slot.first}-{slot.last}, alone or split "
                          f"(excluded: {len(self.excluded)} peers); last failure: {reason}") from None
        parts = [Slot(seg.first, seg.last, seg.peer_id, self._session_id(), self.hidden, rebuild=True) for seg in chain]
        parts[0].inputs = slot.inputs.copy()
        for part in parts[1:]:
            part.awaiting_inputs = True
        self.slots[index:index + 1] = parts
        self.resplits.append({"first": slot.first, "last": slot.last, "parts": [(p.first, p.last) for p in parts]})

    def provider(self, first: int, last: int, exclude: Collection[str]) -> str | None:
        """A server holding all of ``first..last`` outside ``exclude``, drawn with the rng."""
        fits = sorted({s.peer_id for s in self.servers if s.first <= first and last <= s.last and s.peer_id not in exclude})
        return self.rng.choice(fits) if fits else None

    def verifiers(self) -> list[tuple[int, str | None]]:
        """Per span, another provider (none of the peers whose rows it checks) to re-execute it."""
        return [(i, self.provider(s.first, s.last, {*s.producers, s.peer, *self.excluded})) for i, s in enumerate(self.slots)]

    def check_reexecution(self, index: int, reexecuted: WireTensor) -> list[int]:
        """Rows of span ``index`` whose re-execution disagrees with what the client used."""
        slot = self.slots[index]
        again = rows(reexecuted)
        if again.shape != slot.outputs.shape:
            return list(range(len(slot.outputs)))
        bad = ~np.all(np.abs(again - slot.outputs) <= TOLERANCE["atol"] + TOLERANCE["rtol"] * np.abs(again), axis=1)
        return [int(r) for r in np.nonzero(bad)[0]]

    def blame(self, index: int, bad_rows: Sequence[int]) -> set[str]:
        return {self.slots[index].producers[r] for r in bad_rows}
