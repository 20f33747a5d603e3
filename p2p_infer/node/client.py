"""The light client: joins without serving, keeps raw input and output local, routes the
middle layers through peers, and fails over when a peer dies.

    async with Client(bootstrap=["/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo..."]) as client:
        result = await client.embed("a sentence")
        print(result.output["embedding"][:4], result.route)

The client runs the model's ``embed`` stage and its first ``local_layers`` layers itself,
and ``finish`` (pooling / head) itself: only hidden states cross the network.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
import torch
import trio
from libp2p.abc import IHost
from libp2p.tools.anyio_service import background_trio_service

from ..clock import now_ms
from ..config import default_cache_dir
from ..net.dht import Discovery
from ..net.directory import Directory
from ..errors import BadTensor, FrameError, NoRoute, P2PInferError, PeerUnreachable, ProtocolViolation, RemoteError
from ..proto.forward import ForwardRequest, Hop, parse_forward_reply
from ..proto.wire import FORWARD_PROTOCOL, RESULT_PROTOCOL
from ..net.framing import Message, remote_peer
from ..net.host import add_handler, full_addrs, parse_peer_addr, running_host
from ..identity import Identity
from ..ml.models import Activation, SplitModel, known_manifests, load_model
from ..proto.audit import AuditLog
from ..proto.auditor import Auditor, evidence_message
from . import committee_client, zk_client
from ..proto.consensus import outputs_agree
from ..net.gossip import Gossip, running_gossip
from ..proto.reputation import Reputation
from ..proto.routing import Segment, Server, plan_route
from ..ml.tensors import activation_to_wire, decode_tensor, encode_tensor
from ..net.streams import StreamPool
from ..verify.zk import ZkError

from .results import HopReport, QueryResult

log = structlog.get_logger("p2p_infer.client")
RETRYABLE_REMOTE_CODES = {"internal", "overloaded", "not_served", "unknown_model", "unreachable"}


class Client:
    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        identity: Identity | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        local_layers: int = 1,
        forwarding: bool = False,
        max_retries: int = 3,
        request_timeout: float = 30.0,
        refresh_interval: float = 10.0,
        committee: int | None = None,
        commit_timeout: float = 5.0,
        reveal_timeout: float = 5.0,
        max_reruns: int = 2,
        spot_check: float = 0.0,
        trial: bool = True,
        audit_log: Path | None = None,
        critical: bool = False,
        proof_follows: bool = False,
    ) -> None:
        if local_layers < 1:
            raise ValueError("the client runs at least one layer itself (local_layers >= 1)")
        self.bootstrap = [parse_peer_addr(a) for a in bootstrap]
        self.identity = identity or Identity.generate()
        self.listen = listen
        self.local_layers = local_layers
        self.forwarding = forwarding
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.refresh_interval = refresh_interval
        self.committee = committee
        self.commit_timeout = commit_timeout
        self.reveal_timeout = reveal_timeout
        self.max_reruns = max_reruns
        self.spot_check = spot_check
        self.trial = trial
        self.critical = critical  # ZK: every shard returns a proof; the client checks the chain
        self.proof_follows = proof_follows  # critical mode: results first, proofs via verify_followed()
        self.reputation = Reputation()
        self.auditor = Auditor(self.reputation, AuditLog(audit_log, self.identity, now_ms) if audit_log else None)
        self.gossip: Gossip | None = None
        self._nursery: trio.Nursery | None = None
        self._trials: dict[str, bool] = {}  # peer -> passed
        self._followed: dict[int, tuple[Any, Activation, Activation, list[Any]]] = {}  # proofs still to collect
        self._verdicts: list[dict[str, Any]] = []  # this query's stage verdicts, gossiped at its end
        self.host: IHost | None = None
        self.directory: Directory | None = None
        self.rtt_ms: dict[str, float] = {}
        self.pool: StreamPool | None = None
        self._pending: dict[str, tuple[trio.MemorySendChannel[Message], str]] = {}
        self._stack: AsyncExitStack | None = None
        self._models: dict[str, SplitModel] = {}

    # ---- lifecycle ----

    async def __aenter__(self) -> Client:
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            manifests = await trio.to_thread.run_sync(known_manifests, default_cache_dir())
            self.host = await self._stack.enter_async_context(running_host(self.identity, self.listen))
            add_handler(self.host, RESULT_PROTOCOL, self._on_result)
            self.pool = StreamPool(self.host, self._addrs_of)
            discovery = Discovery(self.host, server=False, bootstrap=self.bootstrap)
            await self._stack.enter_async_context(background_trio_service(discovery.kad))
            self.gossip = await self._stack.enter_async_context(running_gossip(self.host, self._on_gossip))
            if not await discovery.join():
                raise PeerUnreachable("no bootstrap peer reachable")
            self.directory = Directory(discovery, manifests)
            nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(nursery.cancel_scope.cancel)
            self._nursery = nursery
            await self.refresh()
            nursery.start_soon(self._keep_fresh)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stack is not None
        if self.gossip is not None:
            await self.gossip.flush()  # verdicts and evidence of the last query still go out
        await self._stack.__aexit__(None, None, None)

    async def refresh(self) -> None:
        """Re-read the overlay and re-measure round trips to the peers that serve layers."""
        assert self.directory is not None
        await self.directory.refresh(list(self.directory.known_models))
        async with trio.open_nursery() as nursery:
            for record in self.directory.live():
                if record.shards:
                    nursery.start_soon(self._measure_rtt, record.peer_id)

    async def _keep_fresh(self) -> None:
        while True:
            await trio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("background refresh failed")

    # ---- public API ----

    async def embed(self, text: str) -> QueryResult:
        return await self.run("minilm-l6", text)

    async def classify(self, pixels: Sequence[float]) -> QueryResult:
        return await self.run("digits-mlp", list(pixels))

    async def model(self, name: str) -> SplitModel:
        if name not in self._models:
            self._models[name] = await trio.to_thread.run_sync(load_model, name, default_cache_dir())
        return self._models[name]

    async def run(self, model_name: str, inputs: Any) -> QueryResult:
        model = await self.model(model_name)
        n_layers = len(model.layers)
        if self.local_layers >= n_layers:
            raise ValueError(f"{model_name} has {n_layers} layers; the client keeps {self.local_layers} locally")
        started = time.perf_counter()
        act = model.embed(inputs)
        act = Activation(model.run_layers(act, 0, self.local_layers - 1), act.mask)
        local_ms = (time.perf_counter() - started) * 1000
        failed: list[str] = []
        hops: list[HopReport] = []
        await self._admit_servers(model)
        if self.committee:
            act, hops, stages, cert = await committee_client.run_committees(self, model, act)
            finish_start = time.perf_counter()
            output = model.finish(act)
            local_ms += (time.perf_counter() - finish_start) * 1000
            return QueryResult(model.name, model.model_id, output, hops, local_ms, (time.perf_counter() - started) * 1000,
                               f"committee k={self.committee}", stages=stages, certificate=cert)
        sent_to_first = act
        mode = "critical" if self.critical else "forwarding" if self.forwarding else "client"
        if self.forwarding and not self.critical:
            try:
                act, hops = await self._run_forwarding(model, act, failed)
            except P2PInferError as exc:
                log.info("forwarding failed, falling back to client-driven hops", reason=exc.message)
                mode = "client (after forwarding failed)"
                hops = []
        checks: list[dict[str, Any]] = []
        proofs: list[Any] | None = [] if self.critical else None
        if not hops:
            act, hops = await self._run_client_driven(model, act, failed, checks, proofs)
        proof_report = None
        if proofs is not None and self.proof_follows:
            proof_report = {"verified": None, "pending": len(proofs)}
            self._followed[id(proof_report)] = (model, sent_to_first, act, proofs)
        elif proofs is not None:
            proof_report = await zk_client.check_proofs(self, model, sent_to_first, act, proofs)
        finish_start = time.perf_counter()
        output = model.finish(act)
        local_ms += (time.perf_counter() - finish_start) * 1000
        return QueryResult(
            model=model.name,
            model_id=model.model_id,
            output=output,
            route=hops,
            local_ms=local_ms,
            total_ms=(time.perf_counter() - started) * 1000,
            mode=mode,
            retries=len(failed),
            failed_peers=failed,
            spot_checks=checks,
            proofs=proof_report,
        )

    # ---- routing ----

    def servers(self, model: SplitModel) -> list[Server]:
        """Servers of ``model`` this client will use: trusted, and past their trial task."""
        assert self.directory is not None
        return [
            Server(r.peer_id, s.first, s.last, r.throughput, r.load, self.rtt_ms.get(r.peer_id))
            for r, s in self.directory.shards_of(model.model_id)
            if self.reputation.trusted(r.peer_id) and (not self.trial or self._trials.get(r.peer_id, False))
        ]

    def plan(self, model: SplitModel, first: int, exclude: Sequence[str] = ()) -> list[Segment]:
        return plan_route(self.servers(model), first, len(model.layers) - 1, exclude=exclude,
                          reputation=self.reputation.of, model_name=model.name, whole_shards=self.critical)

    # ---- trial tasks: a known answer before live traffic ----

    async def _admit_servers(self, model: SplitModel) -> None:
        if not self.trial or self.directory is None:
            return
        untried = {r.peer_id: s for r, s in self.directory.shards_of(model.model_id) if r.peer_id not in self._trials}
        async with trio.open_nursery() as nursery:
            for peer_id, shard in untried.items():
                nursery.start_soon(self._trial, model, peer_id, shard.first)

    async def _trial(self, model: SplitModel, peer_id: str, layer: int) -> None:
        """Send one layer's worth of random input; pass only on the answer computed here."""
        act = model.sample_activation(tokens=8, random=True)
        expected = encode_tensor(model.run_layers(act, layer, layer))
        try:
            hidden, _ = await self._call_segment(model, Segment(Server(peer_id, layer, layer, 1.0), layer, layer), act)
            passed = outputs_agree(encode_tensor(hidden), expected)
        except (P2PInferError, trio.TooSlowError) as exc:
            log.info("trial task failed to run", peer=peer_id, reason=getattr(exc, "message", "timed out"))
            return  # not admitted, not judged: it may be tried again later
        self._trials[peer_id] = passed
        self.reputation.record(peer_id, fault=not passed)
        if passed:
            self.reputation.admit(peer_id)
        log.info("trial task", peer=peer_id, passed=passed)

    # ---- critical mode: ZK proofs ----

    async def verify_followed(self, result: QueryResult) -> dict[str, Any]:
        """Proof-follows mode: collect the proofs of ``result`` from the peers, then verify them and the chain."""
        return await zk_client.verify_followed(self, result)

    async def _on_gossip(self, sender: str, message: dict[str, Any]) -> None:
        for evidence in self.auditor.observe(sender, message):
            self._publish(evidence_message(evidence))

    def _publish(self, message: dict[str, Any]) -> None:
        if self.gossip is not None and self._nursery is not None:
            self.gossip.publish_soon(self._nursery, message)

    async def _spot_check(self, model: SplitModel, segment: Segment, act: Activation, hidden: torch.Tensor,
                          checks: list[dict[str, Any]]) -> torch.Tensor:
        """Re-run a stage on one other random provider; if the two disagree, settle it with
        the client's own copy of the weights, penalise whoever was wrong, and keep the truth."""
        others = [s for s in self.servers(model) if s.first <= segment.first and segment.last <= s.last and s.peer_id != segment.peer_id]
        if not others:
            return hidden
        checker = random.choice(others)
        check: dict[str, Any] = {"first": segment.first, "last": segment.last, "primary": segment.peer_id, "checker": checker.peer_id}
        try:
            second, _ = await self._call_segment(model, Segment(checker, segment.first, segment.last), act)
        except (P2PInferError, trio.TooSlowError):
            check["outcome"] = "checker unavailable"
            checks.append(check)
            return hidden
        if outputs_agree(encode_tensor(hidden), encode_tensor(second)):
            check["outcome"] = "agree"
            for peer in (segment.peer_id, checker.peer_id):
                self.reputation.record(peer, fault=False)
        else:
            truth = model.run_layers(act, segment.first, segment.last)
            wrong = [p for p, out in ((segment.peer_id, hidden), (checker.peer_id, second))
                     if not outputs_agree(encode_tensor(out), encode_tensor(truth))]
            for peer in (segment.peer_id, checker.peer_id):
                self.reputation.record(peer, fault=peer in wrong)
            check["outcome"], check["wrong"] = "disagree", wrong
            log.warning("spot check caught a wrong result", layers=f"{segment.first}-{segment.last}", wrong=wrong)
            hidden = truth
        checks.append(check)
        return hidden

    # ---- committee mode ----

    async def _run_client_driven(
        self, model: SplitModel, act: Activation, failed: list[str], checks: list[dict[str, Any]] | None = None,
        proofs: list[Any] | None = None,
    ) -> tuple[Activation, list[HopReport]]:
        """Send each stage's activation from the client; on a failure, exclude the peer and
        re-route the layers still to run, replaying the last good activation."""
        pos, hops = self.local_layers, []
        while pos < len(model.layers):
            route = self._plan_or_refresh(model, pos, failed)
            segment = (await route)[0]
            try:
                hidden, hop = await self._call_segment(model, segment, act, proofs)
                if self.spot_check and random.random() < self.spot_check:
                    hidden = await self._spot_check(model, segment, act, hidden, checks if checks is not None else [])
            except (PeerUnreachable, FrameError, ProtocolViolation, trio.TooSlowError, RemoteError, BadTensor, ZkError) as exc:
                if isinstance(exc, RemoteError) and exc.code not in RETRYABLE_REMOTE_CODES:
                    raise
                if isinstance(exc, (BadTensor, ZkError, ProtocolViolation)):  # it answered, wrongly
                    self.reputation.record(segment.peer_id, fault=True)
                failed.append(segment.peer_id)
                reason = exc.message if isinstance(exc, P2PInferError) else "timed out"
                log.warning("hop failed, re-routing", peer=segment.peer_id, layers=f"{segment.first}-{segment.last}", reason=reason)
                self._drop_stream(segment.peer_id)
                if len(failed) > self.max_retries:
                    raise NoRoute(f"{model.name}: gave up after {len(failed)} failed hops ({reason})") from None
                continue
            act = Activation(hidden, act.mask)
            hops.append(hop)
            pos = segment.last + 1
        return act, hops

    async def _plan_or_refresh(self, model: SplitModel, pos: int, exclude: Sequence[str]) -> list[Segment]:
        try:
            return self.plan(model, pos, exclude)
        except NoRoute:
            await self.refresh()  # maybe a replacement joined since the last refresh
            return self.plan(model, pos, exclude)

    async def _call_segment(
        self, model: SplitModel, segment: Segment, act: Activation, proofs: list[Any] | None = None
    ) -> tuple[Any, HopReport]:
        """One hop; with ``proofs`` (critical mode) the peer must also prove its shard."""
        prove = proofs is not None
        req = ForwardRequest(model.model_id, segment.first, segment.last, *activation_to_wire(act), request_id=uuid.uuid4().hex,
                             prove=("follow" if self.proof_follows else True) if prove else False)
        sent = time.perf_counter()
        reply = await self._request(segment.peer_id, req.to_wire())
        round_trip = (time.perf_counter() - sent) * 1000
        wire, timing = parse_forward_reply(reply)
        hidden = decode_tensor(wire, field="hidden")
        model.check_activation(Activation(hidden, act.mask))
        if proofs is not None and self.proof_follows:
            token = reply.get("proof_token")
            if not isinstance(token, str):
                raise ProtocolViolation(f"{segment.peer_id} sent no proof token")
            proofs.append((segment.peer_id, token, segment.first, segment.last))
        elif proofs is not None:
            from ..verify.zk import ShardProof

            proof = ShardProof.from_wire(reply.get("proof"))
            if (proof.first, proof.last) != (segment.first, segment.last):
                raise ProtocolViolation(f"{segment.peer_id} proved layers {proof.first}-{proof.last}, not {segment.first}-{segment.last}")
            proofs.append(proof)
        return hidden, HopReport(segment.peer_id, segment.first, segment.last, timing.get("compute_ms", 0.0), timing.get("queue_ms", 0.0), round_trip)

    # ---- forwarding mode ----

    async def _run_forwarding(self, model: SplitModel, act: Activation, failed: list[str]) -> tuple[Activation, list[HopReport]]:
        assert self.host is not None and self.directory is not None
        route = await self._plan_or_refresh(model, self.local_layers, failed)
        hops = [Hop(s.peer_id, tuple(self.directory.records[s.peer_id].addrs), s.first, s.last) for s in route]
        request_id = uuid.uuid4().hex
        send, receive = trio.open_memory_channel[Message](1)
        self._pending[request_id] = (send, route[-1].peer_id)
        try:
            first = route[0]
            req = ForwardRequest(model.model_id, first.first, first.last, *activation_to_wire(act), request_id=request_id,
                                 route=hops[1:], reply_to=str(self.host.get_id()), reply_addrs=tuple(full_addrs(self.host)))
            try:
                await self._request(first.peer_id, req.to_wire())
            except P2PInferError:
                failed.append(first.peer_id)
                self._drop_stream(first.peer_id)
                raise
            with trio.fail_after(self.request_timeout):
                result = await receive.receive()
        except trio.TooSlowError:
            raise PeerUnreachable(f"no forwarded result within {self.request_timeout} s") from None
        finally:
            self._pending.pop(request_id, None)
        if result["type"] == "forward_failed":
            failed.append(str(result.get("failed_peer") or result.get("at", "")))
            raise RemoteError(str(result.get("code")), str(result.get("message")), str(result.get("at")))
        wire, _ = parse_forward_reply(result)
        hidden = decode_tensor(wire, field="hidden")
        model.check_activation(Activation(hidden, act.mask))
        reports = [HopReport(str(t.get("peer")), int(t.get("first", 0)), int(t.get("last", 0)),
                             float(t.get("compute_ms", 0.0)), float(t.get("queue_ms", 0.0))) for t in result.get("trace", [])]
        return Activation(hidden, act.mask), reports

    async def _on_result(self, message: Message) -> Message:
        request_id = message.get("request_id")
        pending = self._pending.get(request_id) if isinstance(request_id, str) else None
        if pending is None:
            raise ProtocolViolation(f"no query waiting for result {request_id!r}")
        if message.get("type") not in ("forward_result", "forward_failed"):
            raise ProtocolViolation(f"unexpected message {message.get('type')!r} on {RESULT_PROTOCOL}")
        sender = remote_peer.get()
        if message["type"] == "forward_result" and sender != pending[1]:  # only the route's last hop may answer
            raise ProtocolViolation(f"result for {request_id} from {sender}, expected {pending[1]}")
        pending[0].send_nowait(message)
        return {"type": "ok"}

    # ---- streams ----

    async def _measure_rtt(self, peer_id: str) -> None:
        try:
            start = time.perf_counter()
            await self._request(peer_id, {"type": "ping"}, timeout=5)
            self.rtt_ms[peer_id] = (time.perf_counter() - start) * 1000
        except P2PInferError as exc:
            log.info("peer did not answer ping", peer=peer_id, reason=exc.message)
            self.rtt_ms.pop(peer_id, None)

    async def _request(self, peer_id: str, message: Message, timeout: float | None = None) -> Message:
        assert self.pool is not None
        return await self.pool.request(peer_id, FORWARD_PROTOCOL, message, timeout=timeout or self.request_timeout)

    def _drop_stream(self, peer_id: str) -> None:
        if self.pool is not None:
            self.pool.forget(peer_id)
        self.rtt_ms.pop(peer_id, None)

    def _addrs_of(self, peer_id: str) -> list[str]:
        record = self.directory.records.get(peer_id) if self.directory else None
        return list(record.addrs) if record else []


@asynccontextmanager
async def connect(bootstrap: Sequence[str], **options: Any) -> AsyncIterator[Client]:
    async with Client(bootstrap, **options) as client:
        yield client
