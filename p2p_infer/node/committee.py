"""The committee protocol's member side (``/p2p-infer/committee/5.0.0``), as a thin trio
handler: decode the request, check it against the served shards and the client's signed
candidate set (the member computes only tasks it was selected for), compute (torch, in the
peer's worker threads), and let the sans-IO rules in :mod:`proto.committee_member` sign
and remember. Test misbehaviour lives in :mod:`testing.adversaries`, which wraps the
pieces of an honest member; nothing here knows about it. Spec: ``protocols/committee.md``."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..clock import now_ms
from ..errors import NotServed
from ..identity import Identity
from ..ml.tensors import activation_from_wire, encode_tensor
from ..net.framing import remote_peer
from ..proto.committee_codec import (
    ExecuteRequest,
    MemberAnswer,
    TicketRequest,
    activation_hash,
    parse_request,
    result_reply,
    round_message,
    ticket_reply,
)
from ..proto.committee_member import MemberCore
from ..proto.consensus import StageTask
from ..proto.wire import Message

if TYPE_CHECKING:  # torch is imported only by peers that serve layers (ml/catalog.py)
    import torch

    from ..ml.models import Activation
    from ..ml.shards import ShardServer

__all__ = ["CommitteeMember", "Later", "Member", "StageCompute", "activation_hash", "dispatch", "layers_compute"]

LayersCompute = Callable[[Any, int, int, "Activation"], Awaitable["torch.Tensor"]]  # the peer's (model, first, last, act)
StageCompute = Callable[[StageTask, Any, "Activation"], Awaitable["torch.Tensor"]]  # one stage task's output
Publish = Callable[[dict[str, Any]], None]
Later = Callable[[int, Callable[[], None]], None]  # run the thunk once the clock reads at least the given ms
Clock = Callable[[], int]


def layers_compute(compute: LayersCompute) -> StageCompute:
    async def run(task: StageTask, model: Any, act: Activation) -> torch.Tensor:
        return await compute(model, task.first, task.last, act)

    return run


class Member(Protocol):
    """What the peer installs on the committee protocol: an honest member or a wrapper."""

    shards: ShardServer | None

    async def handle(self, message: Message) -> Message: ...

    def on_gossip(self, message: dict[str, Any]) -> None: ...


class Steps(Protocol):
    def ticket(self, request: TicketRequest) -> Message: ...

    async def execute(self, request: ExecuteRequest) -> Message: ...


async def dispatch(member: Steps, message: Message) -> Message:
    """One request to the member's step for it (shared by the honest member and wrappers)."""
    request = parse_request(message)
    if isinstance(request, TicketRequest):
        return member.ticket(request)
    return await member.execute(request)


class CommitteeMember:
    def __init__(self, identity: Identity, shards: ShardServer | None, compute: StageCompute, publish: Publish,
                 *, clock: Clock = now_ms, nonce: Callable[[], bytes] = lambda: os.urandom(32),
                 later: Later | None = None) -> None:
        self.core = MemberCore(identity)
        self.shards = shards
        self.compute = compute
        self.publish = publish
        self.later: Later = later or (lambda _at, thunk: thunk())
        self.clock = clock
        self.nonce = nonce

    @property
    def identity(self) -> Identity:
        return self.core.identity

    async def handle(self, message: Message) -> Message:
        return await dispatch(self, message)

    def served(self, model_id: str, first: int, last: int) -> Any:
        if self.shards is None:
            raise NotServed("this peer serves no layers")
        return self.shards.serving(model_id, first, last)

    def ticket(self, request: TicketRequest) -> Message:
        self.served(request.model_id, request.first, request.last)
        return ticket_reply(self.core.ticket(request.seed))

    async def execute(self, request: ExecuteRequest) -> Message:
        return result_reply(await self.answer(request))

    async def answer(self, request: ExecuteRequest, *, reveal: bool = True) -> MemberAnswer:
        task = request.task
        model = self.served(task.model_id, task.first, task.last)
        # the stream's remote peer, authenticated by Noise: only the task's client may ask
        known = self.core.repeated_answer(task, remote_peer.get(), self.clock())
        if known is not None:  # never sign two commitments for one task (that is equivocation)
            return known
        act = activation_from_wire(request.hidden, request.mask)
        assert self.shards is not None  # served() checked it
        model.check_activation(act, self.shards.max_batch)
        self.core.check_execute(request.candidates, request.input_hash, remote_peer.get(), self.clock())
        output = encode_tensor(await self.compute(task, model, act))
        answer = self.core.answer(request.candidates, output, self.nonce(), self.clock(), reveal=reveal)
        if answer.reveal is not None and answer.output is not None:
            # one gossip message per member and task, after the commit deadline: no member can
            # copy it in time, and it costs the client's critical path nothing
            message = round_message(request.candidates, answer.commit, answer.reveal)
            self.later(task.commit_deadline_ms + 1, lambda: self.publish(message))
        return answer

    def on_gossip(self, message: dict[str, Any]) -> None:
        """An honest member needs nothing from gossip (the peer's auditor reads it)."""

