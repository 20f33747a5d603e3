"""The peer process: joins the overlay, serves its shards, keeps its record published.

Every peer runs this same code; a bootstrap peer is a peer that serves nothing and whose
address is written in ``bootstrap/peers.txt``.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio
from libp2p.abc import IHost
from libp2p.tools.anyio_service import background_trio_service

from .. import __version__
from ..clock import now_ms
from ..config import Settings, default_cache_dir
from ..net.dht import Discovery
from ..proto.wire import ARTIFACT_PROTOCOL, COMMITTEE_PROTOCOL, FORWARD_PROTOCOL, SERVED_PROTOCOLS, SESSION_PROTOCOL
from ..net.framing import Handler
from ..net.host import add_handler, full_addrs, parse_peer_addr, running_host
from ..identity import Identity, load_or_create_identity
from ..proto.records import all_peers_key, make_record, model_key, shard_key, sign_record
from ..verify.tee import attest_record_fields, make_attester, policy_from_settings
from ..errors import TeeUnavailable
from ..net.directory import Directory
from ..proto.wire import DKG_PROTOCOL
from .dkg import DkgNode
from ..proto.audit import AuditLog
from ..proto.auditor import Auditor, evidence_message
from .anchors import Anchors
from .artifact_handler import handle_artifact
from ..testing.adversaries import install as install_behaviour
from ..testing import link_delay
from .forward_handler import ForwardHandler
from .proof_handler import ProofHandler
from .session_handler import SessionHandler
from ..net.gossip import Gossip, running_gossip
from ..proto.reputation import Reputation
from ..ml.catalog import ServeSpec
from ..net.streams import StreamPool
from ..net.addressbook import AddressBook
from ..net.framing import remote_peer
from .scheduler import FairScheduler, Job
from . import control_api

if TYPE_CHECKING:  # torch is imported only by peers that serve layers (ml/catalog.py)
    from ..ml.models import Activation
    from ..ml.shards import ShardServer

log = structlog.get_logger("p2p_infer.peer")


REPROVIDE_INTERVAL = 300.0
MAX_PENDING_PROOFS = 64  # uncollected "proof follows" proofs kept per peer
WITHDRAWN_TTL_MS = 2000  # the serving-nothing record put on shutdown lives this long
WITHDRAW_TIMEOUT = 2.0  # seconds shutdown waits for the withdrawal to be stored


def read_bootstrap_file(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def bootstrap_addrs(settings: Settings) -> list[str]:
    addrs = list(settings.bootstrap)
    if settings.bootstrap_file is not None:
        addrs += read_bootstrap_file(settings.bootstrap_file)
    return addrs


class Peer:
    def __init__(self, settings: Settings, identity: Identity | None = None) -> None:
        self.settings = settings
        self.identity = identity or load_or_create_identity(settings.key)
        self.specs = [ServeSpec.parse(s) for s in settings.serve]
        self.shards: ShardServer | None = None
        self.attester = make_attester(settings.tee, settings.tee_quote)  # TeeUnavailable before anything starts
        if settings.threshold_member and self.attester is None:
            raise TeeUnavailable("--threshold-member needs --tee: only attested peers take part in the DKG")
        self.dkg = DkgNode(self) if self.attester is not None else None  # attested peers serve enhanced-privacy stages
        self.throughput = 0.0
        self.limits = settings.limits()
        self.scheduler = FairScheduler(settings.compute_slots(), self.limits.max_queued_per_peer, self.limits.max_queued)
        self.forward = ForwardHandler(self)
        self.prover = ProofHandler(self)
        self.sessions = SessionHandler(self)  # generation sessions (KV caches)
        self.discovery: Discovery | None = None
        self.host: IHost | None = None
        self._nursery: trio.Nursery | None = None  # background forwarding work
        self.pool: StreamPool | None = None  # streams to next hops and clients (forwarding mode)
        self.gossip: Gossip | None = None
        # the committee member, and the hook on plain forward replies (honest unless --test-fault)
        self.behaviour = install_behaviour(settings.test_fault, self.identity, self._compute_layers, self._publish, self._later)
        self.member = self.behaviour.member
        audit_path = settings.audit_log or settings.key.with_suffix(".audit.log")
        audit = AuditLog(audit_path, self.identity, now_ms, settings.audit_max_bytes, settings.audit_budget_bytes)
        self.auditor = Auditor(Reputation(), audit)
        # signed checkpoints of our log out, others' checkpoints kept (witnessed) in (node/anchors.py)
        self.anchors = Anchors(self.identity, audit, settings.witness_path(), settings.checkpoint_interval, self._publish)
        self.auditor.witnesses = self.anchors.witnesses
        self.log = log.bind(peer=self.identity.peer_id)
        self.api = control_api.api_bind(settings)  # --api, refused here (before any load) if not loopback
        self.metrics = control_api.peer_metrics(self)
        self.api_url: str | None = None
        self.on_phase: Callable[[str], None] = lambda _name: None  # start-up progress (the CLI shows it)
        self.served = 0  # compute requests finished, and failed: the heartbeat's counters
        self.failed = 0

    # ---- lifecycle ----

    async def _load_shards(self) -> None:
        if self.specs:  # torch is imported only by peers that serve layers
            import torch

            from ..ml.shards import ShardServer

            torch.set_num_threads(max(1, self.settings.torch_threads))
            self.on_phase("load and verify weights")  # threads abandoned on Ctrl-C: start-up stops at once
            self.shards = await trio.to_thread.run_sync(ShardServer, self.specs, default_cache_dir(), self.settings.max_batch,
                                                        abandon_on_cancel=True)
            self.member.shards = self.shards
            self.on_phase("throughput probe")
            self.throughput = await trio.to_thread.run_sync(self.shards.measure_throughput, abandon_on_cancel=True)
            self.prover.start_builds()

    async def run(self, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        auto = any(s.auto for s in self.specs)  # "--serve MODEL": layers chosen from the directory, after joining
        if not auto:
            await self._load_shards()
        bootstrap = [parse_peer_addr(a) for a in bootstrap_addrs(self.settings)]
        self.on_phase("join")
        async with running_host(self.identity, self.settings.listen, self.limits) as host:
            self.host = host
            discovery = Discovery(host, server=True, bootstrap=bootstrap)
            self.discovery = discovery
            self.pool = StreamPool(host, AddressBook(discovery).addrs)
            self._serve(host, FORWARD_PROTOCOL, self.forward.handle)
            self._serve(host, COMMITTEE_PROTOCOL, self.member.handle)
            self._serve(host, ARTIFACT_PROTOCOL, handle_artifact)
            self._serve(host, SESSION_PROTOCOL, self.sessions.handle)
            if self.dkg is not None:
                self._serve(host, DKG_PROTOCOL, self.dkg.handle)
            async with background_trio_service(discovery.kad), running_gossip(host, self.on_gossip) as gossip:
                self.gossip = gossip
                joined = await discovery.join()
                if bootstrap and not joined:
                    self.log.warning("no bootstrap peer reachable; waiting for others to dial in")
                if auto:
                    self.specs = await choose_layers(self, discovery)
                    await self._load_shards()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.on_phase("publish")
                    await nursery.start(self._publish_loop, discovery)
                    nursery.start_soon(self._heartbeat)
                    nursery.start_soon(discovery.maintain, self.settings.refresh_interval)
                    nursery.start_soon(self.anchors.run)
                    nursery.start_soon(self.sessions.reap)
                    nursery.start_soon(self.prover.build_all)  # ZK circuits, in another process
                    if self.dkg is not None:
                        from ..ml.models import known_manifests

                        manifests = await trio.to_thread.run_sync(known_manifests, default_cache_dir())
                        nursery.start_soon(self.dkg.run, Directory(discovery, manifests, policy_from_settings(self.settings)))
                    if self.api is not None:  # the local control API (GET /status, /metrics)
                        self.api_url = await nursery.start(control_api.serve, self, self.api)
                    addrs = full_addrs(host)
                    self._write_ready_file(addrs)
                    self.log.info(
                        "peer ready",
                        addrs=addrs,
                        serving=[str(s) for s in (self.shards.shards if self.shards else [])],
                        throughput=round(self.throughput, 1),
                        alone=not bootstrap or not joined,  # no bootstrap peer: serves only who dials it
                    )
                    task_status.started(addrs)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self.prover.close()

    def _write_ready_file(self, addrs: list[str]) -> None:
        path = self.settings.ready_file
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"peer_id": self.identity.peer_id, "addrs": addrs, "pid": os.getpid(), "api": self.api_url}))
        os.replace(tmp, path)

    async def _publish_loop(self, discovery: Discovery, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish the record now and again before it expires; announce provider keys."""
        shards = self.shards.shards if self.shards else []
        keys = [all_peers_key()] + sorted({model_key(s.model_id) for s in shards}) + [shard_key(s) for s in shards]
        await self._publish_record(discovery)
        task_status.started()
        await discovery.provide(keys)
        last_provided = trio.current_time()
        while True:
            await trio.sleep(self.settings.republish_every())
            await self._publish_record(discovery)
            # Provider records outlive us (48 h in py-libp2p), but the nodes closest to a key
            # change as peers join: re-announce now and then, not with every record.
            if trio.current_time() - last_provided >= REPROVIDE_INTERVAL:
                await discovery.provide(keys)
                last_provided = trio.current_time()

    def _tee_fields(self) -> dict[str, Any]:
        """The record's TEE kind and a fresh attestation (re-made at each publish: readers check its age)."""
        if self.attester is None:
            return {}
        shards = self.shards.shards if self.shards else []
        manifests = {mid: m.manifest for mid, m in (self.shards.models if self.shards else {}).items()}
        kind, attestation = attest_record_fields(self.attester, self.identity.public_key, shards, manifests, now_ms(),
                                                 fault=self.settings.test_fault)
        return {"tee": kind, "tee_attestation": attestation}

    async def _heartbeat(self) -> None:
        """One log line now and then, so a volunteer sees the peer is alive and used."""
        interval = self.settings.heartbeat_interval
        while interval > 0:
            await trio.sleep(interval)
            conns = self.host.get_network().connections if self.host is not None else {}
            self.log.info("heartbeat", served=self.served, errors=self.failed, load=round(self.load(), 2),
                          connections=len(conns))

    async def withdraw(self) -> None:
        """Before shutdown (the host still running): replace our record with one serving nothing
        that expires in seconds, so clients stop routing to us now, not at the old record's expiry."""
        if self.discovery is None or self.host is None:
            return
        with trio.move_on_after(WITHDRAW_TIMEOUT) as scope:
            try:
                await self._publish_record(self.discovery, withdrawn=True)
            except Exception as exc:  # noqa: BLE001 - best effort while stopping; the old record still expires
                self.log.warning("record withdrawal failed", reason=str(exc))
                return
        self.log.info("record withdrawn" if not scope.cancelled_caught else "record withdrawal timed out")

    async def _publish_record(self, discovery: Discovery, withdrawn: bool = False) -> None:
        assert self.host is not None
        record = make_record(
            self.identity,
            addrs=full_addrs(self.host),
            shards=[] if withdrawn else self.shards.shards if self.shards else [],
            throughput=self.behaviour.advertise(self.throughput),  # the measured value unless a --test-fault lies
            load=self.load(),
            software=f"p2p-infer/{__version__}",
            protocols=SERVED_PROTOCOLS + ((DKG_PROTOCOL,) if self.dkg is not None else ()),
            ttl_ms=WITHDRAWN_TTL_MS if withdrawn else int(self.settings.record_ttl * 1000),
            issued_at_ms=now_ms(),
            **({} if withdrawn else self._tee_fields()),
        )
        await discovery.put_record(self.identity.peer_id, sign_record(record, self.identity), thorough=not withdrawn)
        self.log.debug("record published", expires_in_s=self.settings.record_ttl)

    # ---- compute, shared by every protocol ----

    def admit(self, remote: str | None = None) -> Job:
        """Queue compute for the remote peer of the request being served (Overloaded if its
        share of the queue is full); run it with :meth:`compute`."""
        return self.scheduler.admit(remote if remote is not None else (remote_peer.get() or "local"))

    async def compute(self, model: Any, first: int, last: int, act: Activation, job: Job | None = None) -> tuple[Any, float, float]:
        """Run layers ``first..last`` in a worker thread when the fair scheduler says it is this
        request's turn (``max_concurrent`` at once, remote peers served round-robin)."""
        async with self.scheduler.run(job or self.admit()) as queue_ms:
            assert self.shards is not None
            try:
                run = partial(self.shards.compute, model, first, last, act)
                hidden, compute_ms = run() if self.shards.quick(model, first, last) else await trio.to_thread.run_sync(run)
            except Exception:
                self.failed += 1
                raise
        self.served += 1
        return hidden, compute_ms, queue_ms

    async def _compute_layers(self, model: Any, first: int, last: int, act: Activation) -> Any:
        hidden, _, _ = await self.compute(model, first, last, act)
        return hidden

    def load(self) -> float:
        return self.scheduler.load()

    def _serve(self, host: IHost, protocol: str, handle: Handler) -> None:
        """Install a request handler, counted (and, as a testing aid, delayed)."""
        counted = self.metrics.counted(protocol, handle)
        add_handler(host, protocol, link_delay(counted, self.settings.test_delay_ms, self.settings.test_jitter_ms))

    def start_background(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _publish(self, message: dict[str, Any]) -> None:
        if self.gossip is not None and self._nursery is not None:
            self.gossip.publish_soon(self._nursery, message)

    def _later(self, at_ms: int, thunk: Callable[[], None]) -> None:
        """Run ``thunk`` in the background once the clock reads ``at_ms`` (the member's
        round gossip, held until the commit deadline has passed)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._run_at, at_ms, thunk)

    async def _run_at(self, at_ms: int, thunk: Callable[[], None]) -> None:
        await trio.sleep(max(0.0, (at_ms - now_ms()) / 1000))
        thunk()

    async def on_gossip(self, sender: str, message: dict[str, Any]) -> None:
        self.member.on_gossip(message)
        for evidence in self.auditor.observe(sender, message):
            self._publish(evidence_message(evidence))


async def choose_layers(peer: Peer, discovery: Discovery) -> list[ServeSpec]:
    """``--serve MODEL``: read the directory, pick the span of weakest coverage that fits the
    memory budget (proto/coverage.py), and log the choice and why."""
    from ..ml.models import known_manifests, resolve_model
    from ..ml.shards import layer_bytes
    from ..proto.coverage import Provider, choose_span, parse_size

    budget = parse_size(peer.settings.memory_budget) if peer.settings.memory_budget else default_budget()
    manifests = await trio.to_thread.run_sync(known_manifests, default_cache_dir())
    directory = Directory(discovery, manifests)
    chosen = []
    for spec in peer.specs:
        if not spec.auto:
            chosen.append(spec)
            continue
        model_id = (await trio.to_thread.run_sync(resolve_model, spec.model, default_cache_dir())).model_id
        await directory.refresh([model_id])
        providers = [Provider(r.peer_id, s.first, s.last, r.throughput) for r, s in directory.shards_of(model_id)]
        sizes = await trio.to_thread.run_sync(layer_bytes, spec.model, default_cache_dir())
        choice = choose_span(sizes, providers, budget, exclude=peer.identity.peer_id)
        budget -= choice.span_bytes  # several auto specs share one budget
        peer.log.info("chose layers to serve", model=spec.model, first=choice.first, last=choice.last,
                      providers=len(providers), why=choice.reason)
        chosen.append(spec.chosen(choice.first, choice.last))
    return chosen


def default_budget() -> int:
    """A quarter of the memory free now: room for activations, queues and the rest of the machine."""
    try:
        return max(1, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError):
        return 1 << 30


async def run_peer_until_signalled(peer: Peer, on_ready: Callable[[list[str]], None] | None = None) -> bool:
    """Run until SIGINT or SIGTERM, then shut down cleanly (record withdrawn, host closed).
    A signal during start-up cancels it at once; returns False then (True after serving)."""
    ready = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    peer.log.info("shutting down" if ready else "start-up interrupted", signal=signal.Signals(signum).name)
                    if ready:
                        await peer.withdraw()
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            addrs = await nursery.start(peer.run)
            ready = True
            if on_ready is not None:
                on_ready(addrs)
    return ready
