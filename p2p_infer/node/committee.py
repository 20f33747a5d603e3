"""The committee protocol (``/p2p-infer/committee/1.0.0``): a member's side of sortition,
redundant execution and commit-reveal. The client's side lives in :mod:`client`; the
rules themselves in :mod:`consensus`. Spec: ``protocols/committee.md``."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import torch
import trio

from ..proto.consensus import (
    Reveal,
    StageRound,
    StageTask,
    Ticket,
    activation_digest,
    commitment,
    make_ticket,
    output_hash,
    sign_commit,
    sign_reveal,
)
from ..errors import NotServed, P2PInferError, ProtocolViolation, Withheld
from ..proto.wire import COMMITTEE_PROTOCOL, ROUND, Message
from ..identity import Identity
from ..ml.models import Activation
from ..ml.shards import ShardServer
from ..clock import now_ms as _now_ms
from ..ml.tensors import decode_tensor, encode_tensor

TEST_FAULTS = ("wrong-output", "no-reveal", "late-commit", "copy", "equivocate", "lie-after-trial")
PENDING_TTL = 120.0  # seconds a member keeps an unrevealed output
log = structlog.get_logger("p2p_infer.committee")

Compute = Callable[[Any, int, int, Activation], Awaitable[torch.Tensor]]
Publish = Callable[[dict[str, Any]], None]


def activation_hash(hidden: dict[str, Any], mask: dict[str, Any] | None) -> bytes:
    """What a stage task binds as its input: the hidden state and its mask, as sent."""
    return activation_digest(output_hash(hidden), b"" if mask is None else output_hash(mask))


class CommitteeMember:
    def __init__(self, identity: Identity, shards: ShardServer | None, compute: Compute, publish: Publish, fault: str = "") -> None:
        if fault and fault not in TEST_FAULTS:
            raise P2PInferError(f"unknown --test-fault {fault!r}; known: {', '.join(TEST_FAULTS)}")
        self.identity = identity
        self.shards = shards
        self.compute = compute
        self.publish = publish
        self.fault = fault
        self.pending: dict[bytes, tuple[dict[str, Any], bytes, float, Any]] = {}
        self.committed: dict[bytes, tuple[Any, float]] = {}  # task -> (our one commit, expiry)
        self.gossiped_reveals: dict[bytes, list[tuple[Reveal, dict[str, Any] | None]]] = {}
        self.log = log.bind(peer=identity.peer_id, fault=fault or None)

    async def handle(self, message: Message) -> Message:
        kind = message.get("type")
        if kind == "ticket":
            return self._ticket(message)
        if kind == "execute":
            return await self._execute(message)
        if kind == "reveal":
            return await self._reveal(message)
        raise ProtocolViolation(f"unknown message type {kind!r} on {COMMITTEE_PROTOCOL}")

    def _served(self, model_id: str, first: int, last: int) -> Any:
        if self.shards is None:
            raise NotServed("this peer serves no layers")
        return self.shards.serving(model_id, first, last)

    def _ticket(self, message: Message) -> Message:
        seed, model_id, first, last = message.get("seed"), message.get("model"), message.get("first"), message.get("last")
        if not (isinstance(seed, bytes) and len(seed) == 32 and isinstance(model_id, str) and isinstance(first, int) and isinstance(last, int)):
            raise ProtocolViolation("ticket: needs seed (32 bytes), model, first, last")
        self._served(model_id, first, last)
        return {"type": "ticket", "ticket": make_ticket(self.identity, seed).to_wire()}

    async def _execute(self, message: Message) -> Message:
        task = StageTask.from_wire(message.get("task"))
        model = self._served(task.model_id, task.first, task.last)
        self._expire()
        if task.task_id in self.committed:  # never sign two commitments for one task (that is equivocation)
            return {"type": "commit", "commit": self.committed[task.task_id][0].to_wire()}
        hidden_wire, mask_wire = message.get("hidden"), message.get("mask")
        act = Activation(decode_tensor(hidden_wire, field="hidden"), None if mask_wire is None else decode_tensor(mask_wire, field="mask"))
        model.check_activation(act)
        if activation_hash(hidden_wire, mask_wire) != task.input_hash:  # type: ignore[arg-type]
            raise ProtocolViolation("execute: input does not match the task's input hash")
        if _now_ms() > task.commit_deadline_ms:
            raise ProtocolViolation("execute: the commit deadline has passed")
        if self.fault == "copy":
            output = encode_tensor(torch.zeros_like(act.hidden))  # computes nothing; hopes to copy later
        else:
            output = encode_tensor(await self.compute(model, task.first, task.last, act))
        if self.fault == "wrong-output":
            noisy = decode_tensor(output) + torch.randn(act.hidden.shape) * 0.5
            output = encode_tensor(noisy)
        nonce = os.urandom(32)
        task_id = task.task_id
        if task_id in self.committed:  # a duplicate request raced this one
            return {"type": "commit", "commit": self.committed[task_id][0].to_wire()}
        if self.fault == "late-commit":
            await trio.sleep(max(0.0, (task.commit_deadline_ms - _now_ms()) / 1000) + 0.3)
        commit = sign_commit(self.identity, task_id, commitment(task_id, output_hash(output), nonce), _now_ms())
        told_network = commit
        if self.fault == "equivocate":  # tell the network something else than the client
            told_network = sign_commit(self.identity, task_id, commitment(task_id, output_hash(output), os.urandom(32)), _now_ms())
        self.pending[task_id] = (output, nonce, time.monotonic() + PENDING_TTL, told_network)
        self.committed[task_id] = (commit, time.monotonic() + PENDING_TTL)
        return {"type": "commit", "commit": commit.to_wire()}

    async def _reveal(self, message: Message) -> Message:
        task_id = message.get("task_id")
        if not isinstance(task_id, bytes):
            raise ProtocolViolation("reveal: needs task_id")
        entry = self.pending.pop(task_id, None)
        if entry is None:
            raise ProtocolViolation("reveal: no pending output for this task")
        output, nonce, _, told_network = entry
        if self.fault == "no-reveal":
            raise Withheld("reveal withheld (test fault)")
        if self.fault == "copy":
            output = await self._copy_someone(task_id) or output
        reveal = sign_reveal(self.identity, task_id, output_hash(output), nonce)
        # one gossip message per member and task (py-libp2p gossip costs ~ms of CPU each)
        self.publish({"type": ROUND, "commit": told_network.to_wire(), "reveal": reveal.to_wire(), "output": output})
        return {"type": "reveal", "reveal": reveal.to_wire(), "output": output}

    async def _copy_someone(self, task_id: bytes) -> dict[str, Any] | None:
        """The copier's move: wait for another member's revealed output and claim it."""
        with trio.move_on_after(2):
            while True:
                for reveal, output in self.gossiped_reveals.get(task_id, []):
                    if reveal.member != self.identity.peer_id and output is not None:
                        return output
                await trio.sleep(0.02)
        return None

    def on_gossip(self, message: dict[str, Any]) -> None:
        """Remember others' reveals (used only by the copy test fault)."""
        if self.fault == "copy" and message.get("type") == ROUND:
            try:
                reveal = Reveal.from_wire(message.get("reveal"))
            except P2PInferError:
                return
            self.gossiped_reveals.setdefault(reveal.task_id, []).append((reveal, message.get("output")))

    def _expire(self) -> None:
        now = time.monotonic()
        for task_id in [t for t, (_, _, exp, _) in self.pending.items() if exp < now]:
            del self.pending[task_id]
        for task_id in [t for t, (_, exp) in self.committed.items() if exp < now]:
            del self.committed[task_id]


def parse_ticket_reply(reply: Message) -> Ticket:
    if reply.get("type") != "ticket":
        raise ProtocolViolation(f"expected ticket, got {reply.get('type')!r}")
    return Ticket.from_wire(reply.get("ticket"))


# ---- the client's role ----

Request = Callable[[str, Message, float], Awaitable[Message]]


async def run_stage_round(
    request: Request,
    task: StageTask,
    candidates: list[str],
    hidden: dict[str, Any],
    mask: dict[str, Any] | None,
    *,
    reveal_timeout: float,
    on_direct_commit: Callable[[Any], None] = lambda _c: None,
) -> StageRound:
    """Sortition, execution and commit-reveal for one stage attempt; returns the round,
    ready for :meth:`StageRound.decide`. Raises NoQuorum when too few candidates answer."""
    from ..proto.consensus import Commit, NoQuorum, rank_tickets

    tickets: list[Ticket] = []

    async def ask_ticket(peer: str) -> None:
        try:
            reply = await request(peer, {"type": "ticket", "seed": task.seed, "model": task.model_id, "first": task.first, "last": task.last}, 3.0)
            ticket = parse_ticket_reply(reply)
            if ticket.peer_id == peer:  # a candidate speaks only for itself
                tickets.append(ticket)
        except P2PInferError as exc:
            log.info("no ticket from candidate", candidate=peer, reason=exc.message)

    async with trio.open_nursery() as nursery:
        for peer in candidates:
            nursery.start_soon(ask_ticket, peer)
    valid_tickets = rank_tickets(tickets, task.seed)  # each VRF proof is verified once, here
    committee = valid_tickets[: task.k]
    if len(committee) < task.k:
        raise NoQuorum(f"stage {task.stage} (layers {task.first}-{task.last}): {len(committee)} eligible candidates for a committee of {task.k}")
    rnd = StageRound(task, committee, valid_tickets)
    execute = {"type": "execute", "task": task.to_wire(), "hidden": hidden, "mask": mask}
    wait_s = max(0.5, (task.commit_deadline_ms - _now_ms()) / 1000 + 1.0)

    async def commit_from(member: str) -> None:
        try:
            reply = await request(member, execute, wait_s)
            commit = Commit.from_wire(reply.get("commit"))
        except P2PInferError as exc:
            log.info("no commit", member=member, reason=exc.message)
            return
        if commit.member != member:  # a member speaks only for itself
            log.info("commit names another member", asked=member, named=commit.member)
            return
        on_direct_commit(commit)
        rnd.on_commit(commit, _now_ms())

    async with trio.open_nursery() as nursery:
        for member in rnd.members:
            nursery.start_soon(commit_from, member)

    async def reveal_from(member: str) -> None:
        try:
            reply = await request(member, {"type": "reveal", "task_id": task.task_id}, reveal_timeout)
            decode_tensor(reply.get("output"), field="output")  # shape, dtype and finiteness before anything else
            reveal = Reveal.from_wire(reply.get("reveal"))
            if reveal.member != member:  # a member speaks only for itself
                log.info("reveal names another member", asked=member, named=reveal.member)
                return
            rnd.on_reveal(reveal, reply.get("output"))  # type: ignore[arg-type]
        except P2PInferError as exc:
            log.info("no reveal", member=member, reason=exc.message)

    async with trio.open_nursery() as nursery:
        for member in list(rnd.commits):
            nursery.start_soon(reveal_from, member)
    return rnd
