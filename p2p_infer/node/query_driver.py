"""Carries out what the sans-IO query machines ask (``proto/query.py``, ``proto/trial.py``).

The I/O of one query: requests on pooled streams under trio deadlines, forwarded results
that arrive on their own protocol, directory refreshes, and the client's own compute to
settle a spot check. What to send, to whom, and what a failure means is the machine's
decision; this module only checks what peers send (tensors, proofs) before the machine
sees it, so an answer that fails a check reaches the machine as the peer's fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..errors import BadTensor, P2PInferError, PeerUnreachable, ProtocolViolation
from ..ml.models import SplitModel
from ..ml.tensors import activation_from_wire, encode_tensor
from ..net.framing import remote_peer
from ..net.host import dial, peer_info
from ..proto.forward import ForwardRequest, Hop, parse_commitment, parse_forward_reply
from ..proto.optimistic import CommitRequest, ForwardCommitment, input_digest
from ..proto.query import (
    Action,
    Arbitrate,
    AwaitResult,
    Done,
    Failed,
    Forget,
    HopFailure,
    QueryMachine,
    Record,
    RefreshDirectory,
    SendForward,
    SendHop,
)
from ..proto.tensors import WireTensor
from ..proto.trial import Admit
from ..proto.wire import FORWARD_FAILED, FORWARD_RESULT, OK, RESULT_PROTOCOL, Message, expect, message_type

if TYPE_CHECKING:
    from .client import Client

log = structlog.get_logger("p2p_infer.client")


@dataclass(frozen=True)
class Reply:
    """A peer's answer that passed the client's checks."""

    output: WireTensor
    timing: dict[str, float]
    evidence: Any = None  # zk: the shard's proof, or (peer, token, first, last) to fetch it later; optimistic: the commitment




async def connect_to(host: Any, addrs_of: Callable[[str], list[str]], peer_ids: list[str]) -> list[str]:
    """Forwarding peers never dial a client (it has no record to check addresses against),
    so the client connects to every hop first: the result and any failure report come back
    over these connections. Returns the peers it could not reach."""
    connected = {str(p) for p in host.get_connected_peers()}
    unreachable: list[str] = []

    async def one(peer_id: str) -> None:
        try:
            await dial(host, peer_info(peer_id, [a.split("/p2p/")[0] for a in addrs_of(peer_id)]))
        except PeerUnreachable:
            unreachable.append(peer_id)

    async with trio.open_nursery() as nursery:
        for peer_id in sorted(set(peer_ids) - connected):
            nursery.start_soon(one, peer_id)
    return unreachable


class ForwardResults:
    """Forwarded results come from the route's last hop on their own protocol, not as a reply."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[trio.MemorySendChannel[Message], str]] = {}

    @contextmanager
    def expect(self, request_id: str, reply_from: str) -> Iterator[trio.MemoryReceiveChannel[Message]]:
        send, receive = trio.open_memory_channel[Message](1)
        self._waiting[request_id] = (send, reply_from)
        try:
            yield receive
        finally:
            self._waiting.pop(request_id, None)

    async def handle(self, message: Message) -> Message:
        """The ``RESULT_PROTOCOL`` handler: hand the result to the query waiting for it."""
        request_id = message.get("request_id")
        waiting = self._waiting.get(request_id) if isinstance(request_id, str) else None
        if waiting is None:
            raise ProtocolViolation(f"no query waiting for result {request_id!r}")
        kind = expect(RESULT_PROTOCOL, message)
        sender = remote_peer.get()
        if kind == FORWARD_RESULT and sender != waiting[1]:  # only the route's last hop may answer
            raise ProtocolViolation(f"result for {request_id} from {sender}, expected {waiting[1]}")
        try:
            waiting[0].send_nowait(message)
        except trio.WouldBlock:  # a second answer for one request: the first one stands
            raise ProtocolViolation(f"result for {request_id} already received") from None
        return {"type": OK}


class QueryDriver:
    """The I/O for one model's machines: a :class:`QueryMachine` or the client's :class:`Admission`."""

    def __init__(self, client: Client, model: SplitModel) -> None:
        self.client = client
        self.model = model

    @staticmethod
    def now() -> float:
        return trio.current_time()

    # ---- a query ----

    async def drive(self, machine: QueryMachine) -> Done:
        """Feed the machine until it is done; raise what it failed with."""
        actions = machine.start(self.now())
        while True:
            step = self._one_wait(actions)
            if isinstance(step, Done):
                return step
            if isinstance(step, Failed):
                raise step.error
            actions = await self._perform(machine, step)

    def _apply(self, actions: list[Any]) -> list[Action]:
        """Apply reputation and stream effects at once; return the actions that need I/O."""
        waits: list[Action] = []
        for action in actions:
            if isinstance(action, Record):
                self.client.reputation.record(action.peer_id, fault=action.fault)
            elif isinstance(action, Admit):
                self.client.reputation.admit(action.peer_id)
            elif isinstance(action, Forget):
                self.client._drop_stream(action.peer_id)
            else:
                waits.append(action)
        return waits

    def _one_wait(self, actions: list[Action]) -> Action:
        waits = self._apply(actions)
        if len(waits) != 1:  # the machine asks one thing at a time
            raise AssertionError(f"expected one action to carry out, got {waits!r}")
        return waits[0]

    async def _perform(self, machine: QueryMachine, step: Action) -> list[Action]:
        if isinstance(step, SendHop):
            return await self._hop(machine, step)
        if isinstance(step, SendForward):
            return await self._forward(machine, step)
        if isinstance(step, RefreshDirectory):
            await self.client.refresh()
            return machine.on_servers(self.client.servers(self.model), self.now())
        if isinstance(step, Arbitrate):
            return self._arbitrate(machine, step)
        raise AssertionError(f"no driver for {step!r}")

    async def _hop(self, machine: QueryMachine, send: SendHop) -> list[Action]:
        outcome = await self.exchange(send)
        if isinstance(outcome, HopFailure):
            if send.purpose == "hop":
                log.warning("hop failed, re-routing", peer=send.peer_id, layers=f"{send.first}-{send.last}", reason=outcome.reason)
            return machine.on_failure(send.request_id, outcome, self.now())
        return machine.on_reply(send.request_id, outcome.output, self.now(), timing=outcome.timing, evidence=outcome.evidence)

    def _arbitrate(self, machine: QueryMachine, step: Arbitrate) -> list[Action]:
        """Two providers disagree: the client's own weights say which was right."""
        truth = self.model.run_layers(activation_from_wire(step.activation, step.mask), step.first, step.last)
        actions = machine.on_arbitration(encode_tensor(truth), self.now())
        wrong = [a.peer_id for a in actions if isinstance(a, Record) and a.fault]
        log.warning("spot check caught a wrong result", layers=f"{step.first}-{step.last}", wrong=wrong)
        return actions

    # ---- one request and its checks ----

    def _commit_request(self, send: SendHop) -> CommitRequest | None:
        """Optimistic mode: every plain request asks for a signed commitment (trials too, so they look alike)."""
        if self.client.query_plan.check != "optimistic" or send.prove:
            return None
        return CommitRequest.draw(self.client._rng)

    async def exchange(self, send: SendHop, commit: CommitRequest | None = None) -> Reply | HopFailure:
        """Send one stage; a failure to answer, or an answer that fails the checks (the peer's fault)."""
        commit = commit or self._commit_request(send)
        message = ForwardRequest(self.model.model_id, send.first, send.last, send.activation, send.mask,
                                 session=send.session, request_id=send.request_id, prove=send.prove, commit=commit).to_wire()
        sent_at = self.now()
        try:  # the pool turns timeouts, resets and bad addresses into PeerUnreachable
            reply = await self.client._request(send.peer_id, message, timeout=max(send.deadline - sent_at, 1e-3))
        except P2PInferError as exc:
            return HopFailure.from_error(exc)
        elapsed_ms = (self.now() - sent_at) * 1000
        try:
            hidden, timing = parse_forward_reply(reply)
            self._check_activation(hidden, send.mask, send.activation)
            evidence = self._evidence(send, reply) if commit is None else self._commitment(send, reply, hidden, commit)
        except P2PInferError as exc:
            return HopFailure.wrong_answer(exc)
        if not send.prove:  # a proof's seconds of proving say nothing about plain throughput
            # timed here, by the client: routing never takes a peer's word for its speed
            self.client.throughput.observe(send.peer_id, send.last - send.first + 1, elapsed_ms,
                                           self.client.rtt_ms.get(send.peer_id))
        return Reply(hidden, timing, evidence)

    def _check_activation(self, hidden: WireTensor, mask: WireTensor | None, sent: WireTensor) -> None:
        """The model's shapes and dtypes (the codec already checked the tensor itself), and one
        answer per input sent: a batch comes back as large as it went out."""
        self.model.check_activation(activation_from_wire(hidden, mask))
        if hidden["shape"][0] != sent["shape"][0]:
            raise BadTensor(f"sent a batch of {sent['shape'][0]}, got {hidden['shape'][0]} answers back")

    def _commitment(self, send: SendHop, reply: Message, hidden: WireTensor, commit: CommitRequest) -> ForwardCommitment:
        """The executor's signature over exactly this answer, or the answer is refused as its fault."""
        commitment = parse_commitment(reply)
        commitment.check(executor=send.peer_id, model_id=self.model.model_id, first=send.first, last=send.last,
                         input_digest=input_digest(send.activation, send.mask), output=hidden, request=commit)
        return commitment

    @staticmethod
    def _evidence(send: SendHop, reply: Message) -> Any:
        """zk: the shard's proof (or its token, when proofs follow), for exactly the layers asked."""
        if send.prove == "follow":
            token = reply.get("proof_token")
            if not isinstance(token, str):
                raise ProtocolViolation(f"{send.peer_id} sent no proof token")
            return (send.peer_id, token, send.first, send.last)
        if not send.prove:
            return None
        from ..verify.zk import ShardProof

        proof = ShardProof.from_wire(reply.get("proof"))
        if (proof.first, proof.last) != (send.first, send.last):
            raise ProtocolViolation(f"{send.peer_id} proved layers {proof.first}-{proof.last}, not {send.first}-{send.last}")
        return proof

    # ---- forwarding ----

    async def _forward(self, machine: QueryMachine, send: SendForward) -> list[Action]:
        """The first hop acknowledges; the result arrives later from the last hop, or never."""
        first, client = send.route[0], self.client
        assert client.host is not None
        hops = [Hop(s.peer_id, (), s.first, s.last) for s in send.route[1:]]  # peers dial hops at their records' addresses
        message = ForwardRequest(self.model.model_id, first.first, first.last, send.activation, send.mask,
                                 session=send.session, request_id=send.request_id, route=hops, reply_to=str(client.host.get_id())).to_wire()
        with client.results.expect(send.request_id, send.reply_from) as inbox:
            try:
                unreachable = await connect_to(client.host, client._addrs_of, [s.peer_id for s in send.route])
                if unreachable:  # hops answer only over connections we opened (protocols/forward.md)
                    raise PeerUnreachable(f"cannot connect to {unreachable[0]}")
                await client._request(first.peer_id, message)
            except P2PInferError as exc:
                log.info("forwarding failed, falling back to client-driven hops", reason=exc.message)
                return machine.on_failure(send.request_id, HopFailure.from_error(exc, peer=first.peer_id), self.now())
            wait = self._one_wait(machine.on_accepted(send.request_id, self.now()))
            assert isinstance(wait, AwaitResult)
            with trio.move_on_at(wait.deadline):
                return self._forwarded(machine, send, await inbox.receive())
        log.info("forwarding failed, falling back to client-driven hops", reason="no forwarded result in time")
        return machine.poll(max(self.now(), wait.deadline))

    def _forwarded(self, machine: QueryMachine, send: SendForward, result: Message) -> list[Action]:
        now = self.now()
        if message_type(result) == FORWARD_FAILED:
            failure = HopFailure(f"{result.get('at')}: {result.get('code')}: {result.get('message')}",
                                 peer=str(result.get("failed_peer") or result.get("at") or ""))
            log.info("forwarding failed, falling back to client-driven hops", reason=failure.reason)
            return machine.on_failure(send.request_id, failure, now)
        try:
            hidden, _ = parse_forward_reply(result)
            self._check_activation(hidden, send.mask, send.activation)
        except P2PInferError as exc:
            log.info("forwarding failed, falling back to client-driven hops", reason=exc.message)
            return machine.on_failure(send.request_id, HopFailure.wrong_answer(exc), now)
        return machine.on_reply(send.request_id, hidden, now, trace=result.get("trace"))
