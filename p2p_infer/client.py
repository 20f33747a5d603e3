"""The light client: joins without serving, keeps raw input and output local, routes the
middle layers through peers, and fails over when a peer dies.

    async with Client(bootstrap=["/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo..."]) as client:
        result = await client.embed("a sentence")
        print(result.output["embedding"][:4], result.route)

The client runs the model's ``embed`` stage and its first ``local_layers`` layers itself,
and ``finish`` (pooling / head) itself: only hidden states cross the network.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
import trio
from libp2p.abc import IHost
from libp2p.tools.anyio_service import background_trio_service

from .config import default_cache_dir
from .dht import Discovery
from .directory import Directory
from .errors import FrameError, NoRoute, P2PInferError, PeerUnreachable, ProtocolViolation, RemoteError
from .forward import FORWARD_PROTOCOL, RESULT_PROTOCOL, ForwardRequest, Hop, parse_forward_reply
from .framing import Message
from .host import add_handler, full_addrs, parse_peer_addr, running_host
from .identity import Identity
from .models import Activation, SplitModel, known_manifests, load_model
from .routing import Segment, Server, plan_route
from .streams import StreamPool

log = structlog.get_logger("p2p_infer.client")
RETRYABLE_REMOTE_CODES = {"internal", "overloaded", "not_served", "unknown_model", "unreachable"}


@dataclass
class HopReport:
    peer: str
    first: int
    last: int
    compute_ms: float = 0.0
    queue_ms: float = 0.0
    round_trip_ms: float = 0.0  # client-driven mode: request sent to reply read


@dataclass
class QueryResult:
    model: str
    model_id: str
    output: dict[str, Any]
    route: list[HopReport]
    local_ms: float
    total_ms: float
    mode: str
    retries: int = 0
    failed_peers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
            if not await discovery.join():
                raise PeerUnreachable("no bootstrap peer reachable")
            self.directory = Directory(discovery, manifests)
            nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(nursery.cancel_scope.cancel)
            await self.refresh()
            nursery.start_soon(self._keep_fresh)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stack is not None
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
        mode = "forwarding" if self.forwarding else "client"
        if self.forwarding:
            try:
                act, hops = await self._run_forwarding(model, act, failed)
            except P2PInferError as exc:
                log.info("forwarding failed, falling back to client-driven hops", reason=exc.message)
                mode = "client (after forwarding failed)"
                hops = []
        if not hops:
            act, hops = await self._run_client_driven(model, act, failed)
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
        )

    # ---- routing ----

    def servers(self, model: SplitModel) -> list[Server]:
        assert self.directory is not None
        return [
            Server(r.peer_id, s.first, s.last, r.throughput, r.load, self.rtt_ms.get(r.peer_id))
            for r, s in self.directory.shards_of(model.model_id)
        ]

    def plan(self, model: SplitModel, first: int, exclude: Sequence[str] = ()) -> list[Segment]:
        return plan_route(self.servers(model), first, len(model.layers) - 1, exclude=exclude, model_name=model.name)

    async def _run_client_driven(self, model: SplitModel, act: Activation, failed: list[str]) -> tuple[Activation, list[HopReport]]:
        """Send each stage's activation from the client; on a failure, exclude the peer and
        re-route the layers still to run, replaying the last good activation."""
        pos, hops = self.local_layers, []
        while pos < len(model.layers):
            route = self._plan_or_refresh(model, pos, failed)
            segment = (await route)[0]
            try:
                hidden, hop = await self._call_segment(model, segment, act)
            except (PeerUnreachable, FrameError, ProtocolViolation, trio.TooSlowError, RemoteError) as exc:
                if isinstance(exc, RemoteError) and exc.code not in RETRYABLE_REMOTE_CODES:
                    raise
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

    async def _call_segment(self, model: SplitModel, segment: Segment, act: Activation) -> tuple[Any, HopReport]:
        req = ForwardRequest(model.model_id, segment.first, segment.last, act, request_id=uuid.uuid4().hex)
        sent = time.perf_counter()
        reply = await self._request(segment.peer_id, req.to_wire())
        round_trip = (time.perf_counter() - sent) * 1000
        hidden, timing = parse_forward_reply(reply)
        model.check_activation(Activation(hidden, act.mask))
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
            req = ForwardRequest(model.model_id, first.first, first.last, act, request_id=request_id,
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
            failed.append(str(result.get("at", "")))
            raise RemoteError(str(result.get("code")), str(result.get("message")), str(result.get("at")))
        hidden, _ = parse_forward_reply(result)
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
