"""The generation driver: a thin I/O loop around :class:`~p2p_infer.proto.generation.GenerationMachine`.

The client tokenises, runs the embedding and layer 0 with its own KV cache, sends each
token's hidden state through the route's sessions (``/p2p-infer/session/2.0.0``), and
applies the final norm, the tied head and the sampling itself: peers see float hidden states
only. Two modes: client-driven (one request per span per token) and forwarded (the token goes
to the first span's peer, which passes its output on peer to peer; the last pushes the final
hidden state to the client, and the reply chain brings every span's signed entry back). A
forwarded token that fails part-way is redone hop by hop (with the failed hop failed over). A failed span is moved to a
replacement and replayed (the machine plans it); with verification (the default) every
span is re-executed by another provider before the answer is final, and a liar caught there
is excluded and the generation run again without it. Usage::

    async with Client(bootstrap=[...], trial=False) as client:
        async for piece in client.generate("What is the capital of France?", max_new_tokens=32):
            print(piece.text, end="", flush=True)
        print(piece.result.to_json())
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..errors import CannotVerify, ForwardIncomplete, NoRoute, P2PInferError, UsageError, VerificationFailed
from ..proto.forward import ForwardRequest
from ..proto.generation import ForwardPlan, GenerationMachine, StepPlan, rows, to_wire
from ..proto.routing import Server
from ..proto.sampling import Sampling, choose
from ..proto.wire import FORWARD_PROTOCOL, SESSION_FORWARDED, SESSION_LINKED, SESSION_OPENED, SESSION_PROTOCOL, expect_reply

if TYPE_CHECKING:
    from .client import Client

log = structlog.get_logger("p2p_infer.generate")
MODEL = "smollm2-135m"
MAX_VERIFY_RERUNS = 2
ROUTE_REFRESHES = 3  # directory refreshes before a missing span is final (no_route)


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    route: list[dict[str, Any]]
    verified: bool
    mode: str  # "verified" | "unverified"
    token_ms: list[float]
    decode: str = "client-driven"  # or "forwarded" (steps passed peer to peer)
    failovers: list[dict[str, str]] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    total_ms: float = 0.0
    forwarded_tokens: int = 0  # tokens that went peer to peer (the rest hop by hop: opens, replays, fallbacks)
    resplits: list[dict[str, Any]] = field(default_factory=list)  # failed spans no single peer could take over

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Piece:
    """One streamed token (``text`` is the new text it adds). ``restart``: verification caught a
    liar, what was streamed so far is void and the answer follows again. The last piece carries
    ``result``."""

    text: str
    token: int | None = None
    index: int = 0
    ms: float = 0.0
    restart: bool = False
    route: list[str] = field(default_factory=list)  # the span peers when this token was made
    result: GenerationResult | None = None


def servers(client: Client, model: Any) -> list[Server]:
    """The model's servers this client trusts (trial tasks do not cover sessions yet)."""
    assert client.directory is not None
    shards = [(r, s) for r, s in client.directory.shards_of(model.model_id) if client.reputation.trusted(r.peer_id)]
    speed = client.throughput.effective({r.peer_id: r.throughput for r, _ in shards})
    return [Server(r.peer_id, s.first, s.last, speed[r.peer_id], r.load, client.rtt_ms.get(r.peer_id)) for r, s in shards]


class Generation:
    def __init__(self, client: Client, prompt: str | list[dict[str, str]], *, max_new_tokens: int = 64,
                 sampling: Sampling | None = None, verified: bool = True, chat: bool = True, timeout: float | None = None,
                 avoid: Collection[str] = (), forwarding: bool = True) -> None:
        """``prompt``: text, or (chat) the conversation so far as ``[{"role", "content"}, ...]``
        ending with the user's turn; ``forwarding``: pass decode steps peer to peer."""
        if max_new_tokens < 1:
            raise UsageError("max_new_tokens must be >= 1")
        if not isinstance(prompt, str) and not chat:
            raise UsageError("a conversation (a list of messages) needs the chat template")
        self.client, self.prompt, self.max_new_tokens, self.chat = client, prompt, max_new_tokens, chat
        self.forwarding = forwarding
        self.sampling = (sampling or Sampling()).validate()
        self.verified = verified
        self.timeout = timeout or client.request_timeout
        self.excluded: set[str] = set()  # caught by verification: never used again in this generation
        self.avoid = set(avoid)  # not routed through on the first attempt (they may still verify)
        self.caught: list[dict[str, Any]] = []

    async def stream(self) -> AsyncIterator[Piece]:
        model = await self.client.model(MODEL)
        ids = await trio.to_thread.run_sync(model.prompt_ids, self.prompt, self.chat)
        started = time.perf_counter()
        for attempt in range(MAX_VERIFY_RERUNS + 1):
            machine = await self._machine(model, len(ids), self.avoid if attempt == 0 else set())
            tokens: list[int] = []
            token_ms: list[float] = []
            if attempt:
                yield Piece("", restart=True)
            async for piece in self._decode(model, machine, ids, tokens, token_ms):
                yield piece
            report = await self._verify(model, machine) if self.verified else {}
            if report.get("agreed", True):
                break
        else:
            raise VerificationFailed(f"generation still disagreed with re-execution after {MAX_VERIFY_RERUNS} reruns")
        text = model.tokenizer.decode(tokens, skip_special_tokens=True)
        result = GenerationResult(text, tokens, len(ids), machine.route, self.verified, "verified" if self.verified else "unverified",
                                  token_ms, "forwarded" if self.forwarding else "client-driven",
                                  [{"peer": p, "reason": r} for p, r in machine.failures], {**report, "caught": self.caught},
                                  (time.perf_counter() - started) * 1000, machine.forwarded_tokens, machine.resplits)
        yield Piece("", result=result)

    async def _machine(self, model: Any, prompt_len: int, avoid: Collection[str]) -> GenerationMachine:
        def build() -> GenerationMachine:
            return GenerationMachine(model.model_id, len(model.layers), 1, model.hidden_size, servers(self.client, model),
                                     self.client._rng, max_length=prompt_len + self.max_new_tokens, commit=self.verified,
                                     reputation=self.client.reputation.of, exclude=self.excluded, avoid=avoid,
                                     forwarded=self.forwarding)
        for attempt in range(ROUTE_REFRESHES + 1):
            try:
                machine = build()
                break
            except NoRoute:
                if attempt == ROUTE_REFRESHES:
                    raise
                await trio.sleep(attempt)  # records found late on a loaded DHT, or a provider that just joined
                await self.client.refresh()
        if self.verified:
            for index, verifier in machine.verifiers():
                if verifier is None:
                    slot = machine.slots[index]
                    raise CannotVerify(f"verified generation needs a second provider of layers {slot.first}-{slot.last} "
                                          f"to re-execute them; none is known (pass --unverified to accept unverified tokens)")
        return machine

    async def _decode(self, model: Any, machine: GenerationMachine, ids: list[int], tokens: list[int],
                      token_ms: list[float]) -> AsyncIterator[Piece]:
        from ..ml.smollm2 import KVCache

        cache, eos, step_ids, shown = KVCache(), model.eos_ids(), ids, ""
        try:
            if machine.forwarded:
                await self._open_all(machine)
            for index in range(self.max_new_tokens):
                t0 = time.perf_counter()
                hidden = await trio.to_thread.run_sync(_first_layer, model, step_ids, cache)
                logits = await self._forwarded(model, machine, hidden) if machine.can_forward(hidden) else None
                if logits is None:  # hop by hop: client-driven mode, opens and replays, a failed forwarded token
                    span = 0
                    while span < len(machine.slots):  # a failed span may be re-split into several mid-token
                        hidden = await self._through(machine, span, hidden)
                        span += 1
                    logits = await trio.to_thread.run_sync(_logits, model, hidden)
                token = choose(logits, self.sampling, index)
                tokens.append(token)
                token_ms.append((time.perf_counter() - t0) * 1000)
                text = model.tokenizer.decode(tokens, skip_special_tokens=True)
                yield Piece(text[len(shown):], token, index, token_ms[-1], route=[s.peer for s in machine.slots])
                shown = text
                if token in eos:
                    break
                step_ids = [token]
        finally:
            with trio.CancelScope(shield=True):
                await self._close_all(machine)

    async def _through(self, machine: GenerationMachine, span: int, hidden: Any) -> Any:
        """One span's step; on failure, fail over to a replacement and replay (bounded by the machine)."""
        while True:
            plan = machine.plan_step(span, hidden)
            try:
                return await self._send(machine, plan)
            except P2PInferError as exc:
                log.info("span failed; failing over with replay", peer=plan.peer[:16], first=machine.slots[span].first,
                         reason=exc.message)
                self.client._drop_stream(plan.peer)
                old = machine.on_failure(plan, f"{exc.code}: {exc.message}")
                if old is not None:
                    self.client._nursery.start_soon(self._close_quietly, plan.peer, old)  # type: ignore[union-attr]

    async def _send(self, machine: GenerationMachine, plan: StepPlan) -> Any:
        assert self.client.pool is not None
        if plan.open is not None:
            reply = await self.client.pool.request(plan.peer, SESSION_PROTOCOL, plan.open.to_wire(), timeout=self.timeout)
            expect_reply(reply, SESSION_OPENED)
            machine.on_opened(plan)
        reply = await self.client.pool.request(plan.peer, SESSION_PROTOCOL, plan.step.to_wire(), timeout=self.timeout)
        return machine.on_output(plan, reply)

    async def _open_all(self, machine: GenerationMachine) -> None:
        """Forwarded mode: open every span's session at once (each names its upstream peer)."""
        async def one(index: int) -> None:
            slot = machine.slots[index]
            try:
                reply = await self.client.pool.request(slot.peer, SESSION_PROTOCOL, machine.opening(index).to_wire(), timeout=self.timeout)  # type: ignore[union-attr]
                expect_reply(reply, SESSION_OPENED)
                machine.on_opened(index)
            except P2PInferError as exc:  # that span opens (or fails over) hop by hop at its first step
                log.info("could not open a session ahead", peer=slot.peer[:16], reason=exc.message)

        async with trio.open_nursery() as nursery:
            for index in range(len(machine.slots)):
                nursery.start_soon(one, index)

    async def _forwarded(self, model: Any, machine: GenerationMachine, hidden: Any) -> Any:
        """One token peer to peer; its logits, or None when it must be redone hop by hop."""
        assert self.client.pool is not None
        pool, plan = self.client.pool, None
        try:
            for index, link in machine.links():
                expect_reply(await pool.request(machine.slots[index].peer, SESSION_PROTOCOL, link.to_wire(), timeout=self.timeout),
                             SESSION_LINKED)
                machine.on_linked(index)
            plan = machine.plan_forward(hidden)
            reply, pushed, logits = await self._forward_once(model, plan)
            machine.on_forwarded(plan, reply, pushed)
            return logits
        except P2PInferError as exc:
            failed = exc.failed if isinstance(exc, ForwardIncomplete) else (plan.first_peer if plan is not None else None)
            log.info("forwarded step incomplete; redoing it hop by hop", reason=exc.message, failed=(failed or "")[:16])
            if failed is not None:
                self.client._drop_stream(failed)
            if plan is None:
                plan = machine.plan_forward(hidden)
            old = machine.on_forward_failed(plan, failed, f"{exc.code}: {exc.message}")
            if old is not None and failed is not None:
                self.client._nursery.start_soon(self._close_quietly, failed, old)  # type: ignore[union-attr]
            return None

    async def _forward_once(self, model: Any, plan: ForwardPlan) -> tuple[Any, Any, Any]:
        """Send the step to the first hop; compute the logits on the last hop's output as soon as
        it arrives, pushed by that hop or, if the reply chain is first, its last entry. The
        first hop's reply (every entry, or which hop failed) and the pushed output, if any."""
        assert self.client.pool is not None
        pool, got = self.client.pool, {}  # type: dict[str, Any]

        async def chain() -> None:
            try:
                got["reply"] = expect_reply(await pool.request(plan.first_peer, SESSION_PROTOCOL, plan.step.to_wire(),
                                                               timeout=self.timeout), SESSION_FORWARDED)
            except P2PInferError as exc:
                got["error"] = exc
            if "error" in got or "failed" in got["reply"]:
                nursery.cancel_scope.cancel()  # nothing to compute on
            else:
                push_wait.cancel()  # the reply carries the last hop's output too

        with self.client.results.expect(plan.request_id, plan.last_peer) as inbox, trio.move_on_after(self.timeout) as deadline:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as push_wait:
                    nursery.start_soon(chain)
                    got["pushed"] = await inbox.receive()
                last = got["pushed"] if "pushed" in got else _last_entry(got["reply"])
                got["logits"] = await trio.to_thread.run_sync(_logits, model, last["hidden"])
        if "error" in got:
            raise ForwardIncomplete(f"first hop: {got['error'].code}: {got['error'].message}", plan.first_peer)
        if deadline.cancelled_caught:
            self.client._drop_stream(plan.first_peer)  # the request may still be in flight on that stream
            raise ForwardIncomplete(f"no forwarded output within {self.timeout} s")
        return got["reply"], got.get("pushed"), got.get("logits")

    async def _close_all(self, machine: GenerationMachine) -> None:
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                for slot in machine.slots:
                    if slot.opened:
                        nursery.start_soon(self._close_quietly, slot.peer, slot.session)

    async def _close_quietly(self, peer: str, session: str) -> None:
        try:
            assert self.client.pool is not None
            with trio.move_on_after(5):
                await self.client.pool.request(peer, SESSION_PROTOCOL, {"type": "session_close", "session": session}, timeout=5)
        except P2PInferError:
            pass  # the session expires on its TTL anyway

    async def _verify(self, model: Any, machine: GenerationMachine) -> dict[str, Any]:
        from .generate_verify import verify_spans

        return await verify_spans(self, model, machine)

    async def reexecute(self, model_id: str, peer: str, first: int, last: int, inputs: Any) -> Any:
        """A stateless prefill of ``inputs`` [n, H] through ``first..last`` on ``peer`` (forward protocol)."""
        assert self.client.pool is not None
        rid = f"{self.client._rng.getrandbits(128):032x}"
        req = ForwardRequest(model_id, first, last, to_wire(inputs), session=rid, request_id=rid)
        reply = await self.client.pool.request(peer, FORWARD_PROTOCOL, req.to_wire(), timeout=self.timeout * 4)
        return expect_reply(reply, "forward_result")["hidden"]


def _last_entry(reply: dict[str, Any]) -> dict[str, Any]:
    hops = reply.get("hops")
    if not isinstance(hops, list) or not hops or not isinstance(hops[-1], dict) or "hidden" not in hops[-1]:
        raise ForwardIncomplete("the forwarded reply carries no output of the last hop")
    return hops[-1]


def _first_layer(model: Any, ids: list[int], cache: Any) -> Any:
    from ..ml.tensors import encode_tensor

    return encode_tensor(model.run_span(model.embed_ids(ids), 0, 0, cache))


def _logits(model: Any, hidden: Any) -> Any:
    import torch

    last = torch.from_numpy(rows(hidden)[None])
    return model.logits(last).double().numpy()


async def generate(client: Client, prompt: str, **options: Any) -> AsyncIterator[Piece]:
    """``async for piece in generate(client, prompt, max_new_tokens=..., sampling=..., verified=...)``."""
    async for piece in Generation(client, prompt, **options).stream():
        yield piece
