"""Misbehaving peers for tests and simulations (``p2p-infer peer --test-fault KIND``).

Each adversary wraps one piece of an honest peer and changes only what it must: the
stage computation (wrong output, a commitment made too late), the member's answer
(reveal withheld, or an output copied from gossip), the gossip it publishes (another
commitment than the client got), or its plain forward replies (lying after its trial).
The honest code in ``node/`` and ``proto/`` knows nothing of them. :func:`install` is the
one place a peer turns ``settings.test_fault`` into its committee member and hooks.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..clock import now_ms
from ..errors import ConfigError, P2PInferError
from ..identity import Identity
from ..ml.tensors import decode_tensor
from ..node.committee import (
    CommitteeMember,
    LayersCompute,
    Later,
    Member,
    Publish,
    StageCompute,
    dispatch,
    layers_compute,
)
from ..proto.committee_codec import ExecuteRequest, TicketRequest, WireTensor, is_round, result_reply
from ..proto.consensus import Commit, Reveal, StageTask, commitment, sign_commit
from ..proto.wire import TICKET, Message
from . import TEST_FAULTS

if TYPE_CHECKING:  # torch is imported only by peers that serve layers (ml/catalog.py)
    import torch

    from ..ml.models import Activation

NOISE = 0.5  # far outside the agreement tolerance: a wrong output is never "close enough"
LATE_BY_S = 0.3  # past the commit deadline, inside the client's grace, so it is judged late
COPY_WAIT_S = 2.0  # how long a copier waits for someone else's gossiped reveal
CLAIMED_THROUGHPUT = 1e9  # what claims-fast advertises (issue 9: it won every route)
SLOW_BY_S = 0.05  # and what it really is: an ordinary peer, 50 ms slower per reply
SLOW_TICKETS_S = 2.0  # slow-tickets: each ticket reply this late (under the 3 s ticket timeout, far past the grace)
log = structlog.get_logger("p2p_infer.adversaries")

ForwardHook = Callable[["torch.Tensor"], "torch.Tensor"]


# ---- compute wrappers ----


def wrong_output(compute: StageCompute) -> StageCompute:
    """Computes honestly, then adds noise: outvoted, and caught with wrong-output evidence."""

    async def run(task: StageTask, model: Any, act: Activation) -> torch.Tensor:
        import torch  # in a serving peer, already loaded

        out = await compute(task, model, act)
        return out + torch.randn(out.shape) * NOISE

    return run


def wrong_shape(compute: StageCompute) -> StageCompute:
    """Computes honestly, then appends a column: an output the next stage's members refuse
    (a first answer shaped to fail the stage a speculating client starts on it)."""

    async def run(task: StageTask, model: Any, act: Activation) -> torch.Tensor:
        import torch  # in a serving peer, already loaded

        out = await compute(task, model, act)
        return torch.cat([out, torch.zeros(*out.shape[:-1], 1)], dim=-1)

    return run


def late_commit(compute: StageCompute) -> StageCompute:
    """Computes honestly, but only lets the member sign once the commit deadline is past."""

    async def run(task: StageTask, model: Any, act: Activation) -> torch.Tensor:
        out = await compute(task, model, act)
        await trio.sleep(max(0.0, (task.commit_deadline_ms - now_ms()) / 1000) + LATE_BY_S)
        return out

    return run


# ---- member wrappers ----


class MemberWrapper:
    """Delegates every step to an honest member; an adversary overrides one."""

    def __init__(self, inner: CommitteeMember) -> None:
        self.inner = inner

    @property
    def shards(self) -> Any:
        return self.inner.shards

    @shards.setter
    def shards(self, value: Any) -> None:
        self.inner.shards = value

    async def handle(self, message: Message) -> Message:
        return await dispatch(self, message)

    def ticket(self, request: TicketRequest) -> Message:
        return self.inner.ticket(request)

    async def execute(self, request: ExecuteRequest) -> Message:
        return await self.inner.execute(request)

    def on_gossip(self, message: dict[str, Any]) -> None:
        self.inner.on_gossip(message)


class NoReveal(MemberWrapper):
    """Answers with its signed commitment and withholds the reveal (and so publishes nothing)."""

    async def execute(self, request: ExecuteRequest) -> Message:
        return result_reply(await self.inner.answer(request, reveal=False))


class SlowTickets(MemberWrapper):
    """An honest member that answers ticket requests SLOW_TICKETS_S late (an overloaded or
    far-away candidate): a query must not wait for it once the other candidates' tickets
    are in (TICKET_GRACE_MS), and its ticket, when it comes, serves the session's later queries."""

    async def handle(self, message: Message) -> Message:
        if isinstance(message, dict) and message.get("type") == TICKET:
            await trio.sleep(SLOW_TICKETS_S)
        return await dispatch(self, message)


class Copier(MemberWrapper):
    """Computes nothing and commits to another member's gossiped output if one arrives
    before the commit deadline, else to zeros. Honest members gossip a round only after
    the deadline, and since topic v6 a round carries only its output's hash, so there is
    never anything to copy: the copier answers zeros and is outvoted (wrong-output)."""

    def __init__(self, inner: CommitteeMember) -> None:
        super().__init__(inner)
        self.seen: dict[bytes, list[tuple[Reveal, Any]]] = {}
        inner.compute = self.compute

    def on_gossip(self, message: dict[str, Any]) -> None:
        if not is_round(message):
            return
        try:
            reveal = Reveal.from_wire(message.get("reveal"))
        except P2PInferError:
            return
        if reveal.member != self.inner.identity.peer_id:
            self.seen.setdefault(reveal.task_id, []).append((reveal, message.get("output")))

    async def compute(self, task: StageTask, model: Any, act: Activation) -> torch.Tensor:
        import torch  # in a serving peer, already loaded

        copied = await self._copy_someone(task)
        return torch.zeros_like(act.hidden) if copied is None else decode_tensor(copied, field="output")

    async def _copy_someone(self, task: StageTask) -> WireTensor | None:
        wait = min(COPY_WAIT_S, max(0.0, (task.commit_deadline_ms - now_ms()) / 1000 - 0.1))
        with trio.move_on_after(wait):
            while True:
                for _, output in self.seen.get(task.task_id, []):
                    if isinstance(output, dict):
                        return output
                await trio.sleep(0.02)
        return None


# ---- gossip wrapper ----


def equivocating(publish: Publish, identity: Identity) -> Publish:
    """Gossips a different signed commitment for the task than the one the client got;
    the client, holding both, turns them into equivocation evidence."""

    def send(message: dict[str, Any]) -> None:
        if is_round(message):
            told_client = Commit.from_wire(message["commit"])
            other = commitment(told_client.task_id, os.urandom(32), os.urandom(32))
            message = {**message, "commit": sign_commit(identity, told_client.task_id, told_client.candidates_id, other, now_ms()).to_wire()}
        publish(message)

    return send


# ---- forward wrapper ----


@dataclass
class LieAfterTrial:
    """Answers its first plain forward request honestly, like a peer passing its trial
    task, then adds 0.5 to every output (caught by spot checks)."""

    served: int = 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.served += 1
        return hidden if self.served <= 1 else hidden + NOISE


@dataclass
class ClaimsFast:
    """Issue 9's throughput liar: advertises 1e9 layers/s in its record while being an
    ordinary peer SLOW_BY_S slower per reply, and answers each client's first plain request
    honestly (its trial, if trials look like a first request) and every later one wrongly."""

    served: dict[str, int] = field(default_factory=dict)  # plain requests answered, per client

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        from ..net.framing import remote_peer

        client = remote_peer.get()
        self.served[client] = self.served.get(client, 0) + 1
        return hidden if self.served[client] <= 1 else hidden + NOISE


def honest_forward(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def wrong_hidden(hidden: torch.Tensor) -> torch.Tensor:
    return hidden + 0.5


async def no_pause() -> None:
    return None


async def slow_reply() -> None:
    await trio.sleep(SLOW_BY_S)  # asleep, not busy: the peer answers pings as fast as anyone


def truthful(measured: float) -> float:
    return measured


def claims_fast(_measured: float) -> float:
    return CLAIMED_THROUGHPUT


# ---- installing one ----


@dataclass
class Behaviour:
    """What a peer runs: its committee member and the hook on its plain forward replies."""

    member: Member
    forward_output: ForwardHook = field(default=honest_forward)
    pace: Callable[[], Awaitable[None]] = field(default=no_pause)  # awaited before each plain forward reply
    advertise: Callable[[float], float] = field(default=truthful)  # measured throughput -> what the record says


def install(fault: str, identity: Identity, compute: LayersCompute, publish: Publish, later: Later | None = None) -> Behaviour:
    """The peer's committee member and hooks for ``--test-fault fault`` ("" = honest)."""
    if fault and fault not in TEST_FAULTS:
        raise ConfigError(f"unknown --test-fault {fault!r}; known: {', '.join(TEST_FAULTS)}")
    stage_compute = layers_compute(compute)
    if fault:
        log.warning("test fault installed: this peer misbehaves on purpose", peer=identity.peer_id, fault=fault)
    if fault in ("wrong-output", "consistent-liar"):  # consistent-liar: wrong in committees and in plain replies
        stage_compute = wrong_output(stage_compute)
    elif fault == "wrong-shape":
        stage_compute = wrong_shape(stage_compute)
    elif fault == "late-commit":
        stage_compute = late_commit(stage_compute)
    elif fault == "equivocate":
        publish = equivocating(publish, identity)
    member = CommitteeMember(identity, None, stage_compute, publish, later=later)
    if fault == "no-reveal":
        return Behaviour(NoReveal(member))
    if fault == "copy":
        return Behaviour(Copier(member))
    if fault == "slow-tickets":
        return Behaviour(SlowTickets(member))
    if fault == "claims-fast":
        return Behaviour(member, ClaimsFast(), slow_reply, claims_fast)
    if fault == "consistent-liar":  # honest on each client's first plain request (its trial), wrong on the rest
        return Behaviour(member, ClaimsFast())
    if fault == "wrong-generation":  # lies on every session step and forward reply, from the first
        return Behaviour(member, wrong_hidden)
    return Behaviour(member, LieAfterTrial() if fault == "lie-after-trial" else honest_forward)
