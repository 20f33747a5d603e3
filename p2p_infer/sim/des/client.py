"""A light client in the discrete-event model: its directory (refreshed by Kademlia
provider lookups through ``proto.kademlia.Lookup``), its reputation table and auditor,
its throughput book, and the per-peer message timing every driver shares.

Queries never wait on a lookup (as in ``net/directory.py``): the directory is refreshed in
the background every ``refresh_s``, and when the query machine asks (``RefreshDirectory``).

Committee tickets are per client session (committee/5.0.0, as
``node/committee_client.TicketSession``): a random session, each candidate's ticket on
``ticket_seed(client_key, session)`` fetched once and used by every query until the session
is renewed; a peer found unreachable loses its held ticket (as the real client's
``_on_unreachable``). ``messages`` counts the requests this client sends, by type.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...identity import Identity
from ...proto.auditor import Auditor
from ...proto.consensus import Ticket, ticket_seed
from ...proto.kademlia import Lookup, RoutingTable
from ...proto.reputation import Reputation
from ...proto.routing import Server, ThroughputBook
from ...proto.trial import Admission
from ...testing import adversaries as adv
from .world import EventLoop, SimPeer, World, as_process, shard_key

REQUEST_BYTES = 300  # a forward or execute request's framing and fields, beside the activation
CANDIDATE_BYTES = 550  # one candidate (ticket + record) in an execute request
SESSION_MS = 600_000  # as node.committee_client.TicketSession.SESSION_MS


@dataclass
class SimClient:
    index: int
    identity: Identity
    xy: tuple[float, float]
    world: World
    loop: EventLoop
    rng: random.Random
    table: RoutingTable
    reputation: Reputation = field(default_factory=Reputation)
    throughput: ThroughputBook = field(default_factory=ThroughputBook)
    directory: dict[int, set[int]] = field(default_factory=dict)  # shard index -> provider peer indices
    lookup_hops: list[int] = field(default_factory=list)
    lookup_ms: list[float] = field(default_factory=list)
    cpu_ms: float = 0.0  # CPU time the real proto code took on this client (charged as virtual time)
    auditor: Auditor = field(init=False)
    admission: Admission = field(init=False)  # trial verdicts (proto.trial), kept across queries
    trials: Any = None  # des.trials.TrialStats
    messages: Counter[str] = field(default_factory=Counter)  # requests sent: ticket, execute, forward, trial
    session: bytes = b""
    session_started_ms: float = 0.0
    tickets: dict[str, Ticket] = field(default_factory=dict)  # held for the session

    def __post_init__(self) -> None:
        from .trials import TrialStats

        self.auditor = Auditor(self.reputation, own_rounds_only=True)  # other clients' rounds are the peers' to audit
        self.admission = Admission(random.Random(self.rng.random()), timeout=self.world.sc.load.request_timeout_s)
        self.trials = TrialStats()

    def admitted(self, peer: SimPeer) -> bool:
        """Whether ``peer`` may carry live traffic: passed its trial (everyone, with ``des.trial = false``)."""
        return not self.world.sc.des.trial or (peer.known and self.admission.admitted(peer.peer_id))

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def current_session(self) -> bytes:
        """The ticket session, renewed (its tickets forgotten) every SESSION_MS."""
        if not self.session or self.loop.now_ms - self.session_started_ms > SESSION_MS:
            self.session, self.session_started_ms, self.tickets = self.rng.getrandbits(256).to_bytes(32, "big"), self.loop.now_ms, {}
        return self.session

    @property
    def ticket_seed(self) -> bytes:
        return ticket_seed(self.identity.public_key, self.current_session())

    # ---- timing ----

    def one_way_ms(self, peer: SimPeer, nbytes: int) -> float:
        net = self.world.sc.network
        return self.world.latency_ms(self.xy, peer.xy) + self.world.transfer_ms(nbytes) + net.per_message_ms

    def timed(self, fn: Callable[..., Any], *args: Any, owner: Any = None, **kwargs: Any) -> tuple[Any, float]:
        """Run real proto code as ``owner``'s process (this client's by default) and say how
        long it took, scaled: the virtual CPU time it costs."""
        with as_process(owner if owner is not None else self):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            return out, (time.perf_counter() - started) * 1000 * self.world.sc.network.cpu_scale

    def compute_at(self, peer: SimPeer, arrive_ms: float, layers: int, extra_ms: float = 0.0) -> float:
        """When ``peer`` finishes ``layers`` layers for a request arriving at ``arrive_ms`` (one FIFO worker)."""
        start = max(arrive_ms, peer.busy_until_ms)
        peer.busy_until_ms = start + layers * peer.compute_ms_per_layer + extra_ms
        return peer.busy_until_ms + (adv.SLOW_BY_S * 1000 if peer.fault == "claims-fast" else 0.0)

    # ---- what routing sees ----

    def servers(self, shape_only: bool = False) -> list[Server]:
        """What routing sees. ``shape_only`` (committee mode: the route only fixes the stages,
        each committee is drawn from the stage's providers) keys servers by index, so no
        identity is made for a provider that never sits on a candidate list."""
        peers = [self.world.peers[i] for si in sorted(self.directory) for i in self.directory[si]]
        if shape_only:
            return [Server(f"peer{p.index}", p.first, p.last, 1000.0 / p.compute_ms_per_layer) for p in peers]
        peers = [p for p in peers if self.admitted(p) and self.reputation.trusted(p.peer_id)]
        claims = {p.peer_id: adv.CLAIMED_THROUGHPUT if p.fault == "claims-fast" else 1000.0 / p.compute_ms_per_layer for p in peers}
        speed = self.throughput.effective(claims)
        return [Server(p.peer_id, p.first, p.last, speed[p.peer_id], 0.0, 2 * self.world.latency_ms(self.xy, p.xy)) for p in peers]

    # ---- directory refresh: one provider lookup per shard ----

    def refresh(self, done: Callable[[], None] | None = None) -> None:
        remaining = [len(self.world.shards)]

        def one_done() -> None:
            remaining[0] -= 1
            if remaining[0] == 0 and done is not None:
                done()

        for si, (first, last) in enumerate(self.world.shards):
            ProviderLookup(self, si, shard_key(first, last), one_done).start()


class ProviderLookup:
    """Drives one ``proto.kademlia.Lookup`` for a shard's providers over the modelled network."""

    def __init__(self, client: SimClient, shard: int, key: int, done: Callable[[], None]) -> None:
        des = client.world.sc.des
        self.client, self.shard, self.done = client, shard, done
        self.lookup = Lookup(key, client.table.closest(key, des.kademlia_k), k=des.kademlia_k, alpha=des.kademlia_alpha,
                             timeout=client.world.sc.network.dht_timeout_ms / 1000)
        self.found: set[int] = set()
        self.started_ms = client.loop.now_ms
        self.finished = False

    def start(self) -> None:
        self.step()

    def step(self) -> None:
        if self.finished:
            return
        loop, world = self.client.loop, self.client.world
        now_s = loop.now_ms / 1000
        self.lookup.poll(now_s)
        if self.lookup.finished:
            return self.finish()
        asked = self.lookup.next(now_s)
        if not asked and not self.lookup.waiting:
            return self.finish()  # nobody left to ask
        for nid in asked:
            peer = world.by_nid[nid]
            if peer.alive:  # a dead peer never answers: the lookup's own timeout fails it
                loop.after(2 * self.client.one_way_ms(peer, REQUEST_BYTES), self.answer, peer)
        if asked:
            loop.at(now_s * 1000 + self.lookup.timeout * 1000, self.step)

    def answer(self, peer: SimPeer) -> None:
        if self.finished:
            return
        assert peer.table is not None
        des = self.client.world.sc.des
        closer = peer.table.closest(self.lookup.target, des.kademlia_k)
        stored = self.client.world.stores.get(peer.nid, {}).get(self.shard, [])
        if stored:  # a response holds at most k providers
            self.found.update(self.client.rng.sample(stored, min(des.kademlia_k, len(stored))))
        self.lookup.on_response(peer.nid, closer if peer.alive else (), self.client.loop.now_ms / 1000)
        self.step()

    def finish(self) -> None:
        self.finished = True
        client = self.client
        if self.found:
            client.directory[self.shard] = self.found
        client.lookup_hops.append(self.lookup.hops)
        client.lookup_ms.append(client.loop.now_ms - self.started_ms)
        self.done()
