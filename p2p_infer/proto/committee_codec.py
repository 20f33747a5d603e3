"""The committee protocol's messages (``/p2p-infer/committee/5.0.0``) and its gossip, as
typed values with their wire forms. Sans-IO and torch-free: tensors here are wire tensors
(``{"dtype", "shape", "data"}``); the drivers do the I/O and the torch conversion.
Normative description: ``protocols/committee.md``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import ProtocolViolation
from .consensus import CandidateSet, Commit, Reveal, StageTask, Ticket, activation_hash
from .tensors import WireTensor, check_wire_tensor
from .wire import COMMITTEE_PROTOCOL, EXECUTE, RESULT, ROUND, ROUNDS, TICKET, VERDICTS, Message, expect, expect_reply, is_bin, is_int, message_type

__all__ = ["ExecuteRequest", "MemberAnswer", "MemberRequest", "Message", "TicketRequest", "WireTensor", "activation_hash",
           "is_round", "parse_request", "parse_result_reply", "parse_ticket_reply", "result_reply", "round_message",
           "ticket_reply", "verdicts_message"]


# ---- requests (client -> member) ----


@dataclass(frozen=True)
class TicketRequest:
    seed: bytes
    model_id: str
    first: int
    last: int

    def to_wire(self) -> Message:
        return {"type": TICKET, "seed": self.seed, "model": self.model_id, "first": self.first, "last": self.last}

    @classmethod
    def from_wire(cls, message: Message) -> TicketRequest:
        seed, model_id, first, last = message.get("seed"), message.get("model"), message.get("first"), message.get("last")
        if not (is_bin(seed, 32) and isinstance(model_id, str) and is_int(first) and is_int(last)):
            raise ProtocolViolation("ticket: needs seed (32 bytes), model, first, last")
        return cls(seed, model_id, first, last)


@dataclass(frozen=True)
class ExecuteRequest:
    """The task comes inside the candidate set the client signed: the member checks from it
    alone that it is among the k smallest tickets before computing anything."""

    candidates: CandidateSet
    hidden: WireTensor
    mask: WireTensor | None

    @property
    def task(self) -> StageTask:
        return self.candidates.task

    def to_wire(self) -> Message:
        return {"type": EXECUTE, "candidates": self.candidates.to_wire(), "hidden": self.hidden, "mask": self.mask}

    @classmethod
    def from_wire(cls, message: Message) -> ExecuteRequest:
        # tensors are checked by the member's driver (shape, dtype, finiteness) before use
        return cls(CandidateSet.from_wire(message.get("candidates")), message.get("hidden"), message.get("mask"))  # type: ignore[arg-type]

    @property
    def input_hash(self) -> bytes:
        return activation_hash(self.hidden, self.mask)


MemberRequest = TicketRequest | ExecuteRequest


def parse_request(message: Message) -> MemberRequest:
    kind = expect(COMMITTEE_PROTOCOL, message)
    if kind == TICKET:
        return TicketRequest.from_wire(message)
    assert kind == EXECUTE
    return ExecuteRequest.from_wire(message)


# ---- replies (member -> client) ----


def ticket_reply(ticket: Ticket) -> Message:
    return {"type": TICKET, "ticket": ticket.to_wire()}


@dataclass(frozen=True)
class MemberAnswer:
    """A member's whole answer to one task, in the one reply to ``execute``: its signed
    commitment, the signed reveal that opens it, and the output. Members never see each
    other's replies, so nothing is gained by a second round trip for the reveal; what
    commit-reveal still guards (a member copying another's output from gossip) is guarded
    by gossiping the round only after the commit deadline. ``reveal`` is None when a
    member withholds it (a fault: missing-reveal)."""

    commit: Commit
    reveal: Reveal | None
    output: WireTensor | None


def parse_ticket_reply(reply: Message) -> Ticket:
    return Ticket.from_wire(expect_reply(reply, TICKET).get("ticket"))


def result_reply(answer: MemberAnswer) -> Message:
    reveal = None if answer.reveal is None else answer.reveal.to_wire()
    return {"type": RESULT, "commit": answer.commit.to_wire(), "reveal": reveal, "output": answer.output}


def parse_result_reply(reply: Message) -> MemberAnswer:
    expect_reply(reply, RESULT)
    commit = Commit.from_wire(reply.get("commit"))
    if reply.get("reveal") is None:
        return MemberAnswer(commit, None, None)
    # shape, dtype and finiteness before anything else looks at the output
    output = check_wire_tensor(reply.get("output"), field="output")
    return MemberAnswer(commit, Reveal.from_wire(reply.get("reveal")), output)


# ---- gossip on the consensus topic ----


def round_message(candidates: CandidateSet, commit: Commit, reveal: Reveal) -> Message:
    """A member's commit and reveal for one task, once, for audit, with the candidate set
    that selected it (auditors check the member was on the committee). Published only
    after the task's commit deadline. Since topic v6 without the output: the reveal names
    its hash, which is all an auditor checks (equivocation, bad reveals), and the output
    would be most of every message's bytes at every hop (a MiniLM stage: ~27 KB)."""
    return {"type": ROUND, "candidates": candidates.to_wire(), "commit": commit.to_wire(), "reveal": reveal.to_wire()}


def is_round(message: Message) -> bool:
    return message_type(message) == ROUND


MAX_BATCH_ROUNDS = 64  # rounds in one "rounds" message (a query's stages, one member)
MAX_BATCH_BYTES = 512 * 1024  # well under MAX_GOSSIP_BYTES: a batch is flushed before it grows past this


def rounds_message(rounds: list[Message]) -> Message:
    """One member's rounds released together (a query's stages: their deadlines fall within
    one gossip delay), as one gossip message: one signature, one trip through the mesh."""
    return rounds[0] if len(rounds) == 1 else {"type": ROUNDS, "rounds": list(rounds)}


def batches(rounds: list[Message]) -> list[Message]:
    """``rounds`` as few gossip messages as the limits allow (in order)."""
    out: list[Message] = []
    chunk: list[Message] = []
    size = 0
    for r in rounds:
        n = len(msgpack.packb(r, use_bin_type=True))
        if chunk and (len(chunk) >= MAX_BATCH_ROUNDS or size + n > MAX_BATCH_BYTES):
            out.append(rounds_message(chunk))
            chunk, size = [], 0
        chunk.append(r)
        size += n
    return out + ([rounds_message(chunk)] if chunk else [])


def unbatch(message: Message) -> list[Message]:
    """The rounds a gossip message carries (a ``rounds`` batch is every entry, each checked
    alone like a ``round`` from the same signer); any other message is itself."""
    if message_type(message) != ROUNDS:
        return [message]
    rounds = message.get("rounds")
    if not (isinstance(rounds, list) and 0 < len(rounds) <= MAX_BATCH_ROUNDS
            and all(isinstance(r, dict) and message_type(r) == ROUND for r in rounds)):
        raise ProtocolViolation(f"'rounds' must be a list of 1 to {MAX_BATCH_ROUNDS} round messages")
    return list(rounds)


def verdicts_message(client: str, stages: list[dict[str, Any]]) -> Message:
    """A client's verdicts on every stage of one query, once per query."""
    return {"type": VERDICTS, "client": client, "stages": stages}
