"""The modelled network of the discrete-event engine: a virtual clock and event queue,
peers with coordinates (latency), bandwidth and compute speed, their Kademlia routing
tables and provider stores, and what each peer answers (honest or an adversary).

Everything protocol-shaped is the real code: identities from the puzzle-solved pool,
signed capability records, ``proto.kademlia`` tables, ``proto.committee_member.MemberCore``
for tickets, execute checks, commits and reveals; adversaries are ``testing.adversaries``'
wrappers and constants applied where a real peer applies them.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import ScenarioError, SimulationError
from ...identity import Identity
from ...proto import sortition
from ...proto.committee_member import MemberCore
from ...proto.kademlia import RoutingTable, node_id
from ...proto.sortition import Memo
from ...testing import adversaries as adv
from ...testing.population import provider
from ..scenario import Scenario, parse_range

EPOCH_MS = 1_764_000_000_000  # virtual time starts here (records and tasks carry absolute ms)
MODEL_ID = "de" * 32  # the modelled model's id (records advertise it; no weights behind it)
HIDDEN = 8  # the modelled activation: 1 x HIDDEN float32; bandwidth uses hidden_bytes
DES_FAULTS = ("wrong-output", "no-reveal", "late-commit", "copy", "lie-after-trial", "claims-fast", "equivocate")


class EventLoop:
    """A virtual clock (ms) and a heap of callbacks; ties run in scheduling order."""

    def __init__(self, start_ms: float = EPOCH_MS) -> None:
        self.now_ms = float(start_ms)
        self.heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        self.processed = 0

    def at(self, t_ms: float, fn: Callable[..., None], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (max(t_ms, self.now_ms), self.seq, fn, args))

    def after(self, delay_ms: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now_ms + delay_ms, fn, *args)

    def run_until(self, t_ms: float) -> bool:
        """Run events up to ``t_ms``; False when the queue ran dry first."""
        while self.heap and self.heap[0][0] <= t_ms:
            when, _, fn, args = heapq.heappop(self.heap)
            self.now_ms = when
            self.processed += 1
            fn(*args)
        self.now_ms = max(self.now_ms, t_ms) if self.heap else self.now_ms
        return bool(self.heap)


def honest_layers(hidden: np.ndarray, first: int, last: int) -> np.ndarray:
    """The modelled model: each layer a fixed float32 map, so honest replicas agree bit for bit."""
    h = hidden.astype(np.float32)
    for layer in range(first, last + 1):
        h = np.tanh(h * np.float32(0.9) + np.float32(0.05 * layer)).astype(np.float32)
    return h


def wire(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "data": a.tobytes()}


def unwire(t: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(t["data"], dtype="<f4").reshape(t["shape"]).copy()


def run_sync(coro: Any) -> Any:
    """Drive an adversary's coroutine that awaits nothing the clock decides (wrong_output)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise SimulationError("an adversary awaited something the discrete-event model cannot run")


@contextmanager
def as_process(owner: Any) -> Iterator[None]:
    """Run proto code as ``owner``'s own process: ``proto.sortition`` remembers every ticket,
    record and candidate set it verified, once per process; the model runs every peer, client
    and auditor in one Python process, so each gets its own tables, swapped in while its code
    runs (shared tables would let one verification stand for every process's, and hide its CPU)."""
    memos = getattr(owner, "_memos", None)
    if memos is None:
        memos = (Memo(), Memo(), Memo())
        object.__setattr__(owner, "_memos", memos)
    saved = (sortition.BETAS, sortition.RECORDS, sortition.COMMITTEES)
    sortition.BETAS, sortition.RECORDS, sortition.COMMITTEES = memos
    try:
        yield
    finally:
        sortition.BETAS, sortition.RECORDS, sortition.COMMITTEES = saved


@dataclass
class SimPeer:
    """A modelled peer. Its identity (puzzle-solved, ~0.16 CPU-s to make) is taken from the
    pool on first use, so a 10,000-peer run pays only for the peers a client meets; its
    DHT position is drawn from the scenario's seed (uniform on the ring, as SHA-256 of a
    peer id is)."""

    index: int
    world: World
    first: int
    last: int
    fault: str
    compute_ms_per_layer: float
    xy: tuple[float, float]
    collude: bool = False
    alive: bool = True
    busy_until_ms: float = 0.0
    nid: int = 0
    table: RoutingTable | None = None
    issued_ms: int = EPOCH_MS - 10_000  # its current record's issue time (records precede their use)
    hook: Any = None  # the plain forward reply hook (lie-after-trial, claims-fast)
    _identity: Identity | None = None
    _core: MemberCore | None = None
    _record: tuple[int, bytes] | None = None

    @property
    def known(self) -> bool:
        return self._identity is not None

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            self._identity = self.world.next_identity()
            self.world.by_id[self._identity.peer_id] = self
        return self._identity

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def core(self) -> MemberCore:
        if self._core is None:
            self._core = MemberCore(self.identity)
        return self._core

    @property
    def record(self) -> bytes:
        """Its signed capability record, re-signed after a restart."""
        if self._record is None or self._record[0] != self.issued_ms:
            self._record = (self.issued_ms, provider(self.identity, MODEL_ID, self.first, self.last, self.issued_ms).record)
        return self._record[1]

    def restarted(self, now_ms: int) -> None:
        self.alive, self.busy_until_ms = True, float(now_ms)
        self.issued_ms = now_ms - 10_000

    def committee_output(self, hidden: np.ndarray, first: int, last: int) -> np.ndarray:
        """What this member commits to for a stage, as its --test-fault would make it."""
        honest = honest_layers(hidden, first, last)
        if self.fault == "wrong-output" and self.collude:
            return (honest + np.float32(adv.NOISE)).astype(np.float32)  # colluders agree on one wrong output
        if self.fault == "wrong-output":
            import torch

            async def compute(task: Any, model: Any, act: Any) -> Any:
                return torch.from_numpy(honest.copy())

            return run_sync(adv.wrong_output(compute)(None, None, None)).numpy().astype(np.float32)
        if self.fault == "copy":  # a copier finds nothing in time to copy (gossip waits for the deadline)
            return np.zeros_like(honest)
        return honest

    def plain_output(self, hidden: np.ndarray, first: int, last: int, client: str) -> np.ndarray:
        out = honest_layers(hidden, first, last)
        if self.hook is None:
            return out
        from ...net.framing import remote_peer

        token = remote_peer.set(client)
        try:
            return np.asarray(self.hook(out), dtype=np.float32)
        finally:
            remote_peer.reset(token)


@dataclass
class World:
    sc: Scenario
    pool: Any = None  # the IdentityPool
    used: int = 0  # pool slots handed out, in order of first use (so the cache covers whoever is met first)

    def next_identity(self) -> Identity:
        self.used += 1
        return self.pool.get(self.used - 1)
    peers: list[SimPeer] = field(default_factory=list)
    by_id: dict[str, SimPeer] = field(default_factory=dict)
    by_nid: dict[int, SimPeer] = field(default_factory=dict)
    shards: list[tuple[int, int]] = field(default_factory=list)
    stores: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # storing node nid -> shard -> provider indices
    gossip: Any = None  # des.gossip.Gossip, when des.gossip

    def latency_ms(self, a: tuple[float, float], b: tuple[float, float]) -> float:
        net = self.sc.network
        if net.latency == "constant":
            return net.base_latency_ms
        return net.base_latency_ms + math.dist(a, b)

    def transfer_ms(self, nbytes: int) -> float:
        return nbytes * 8 / (self.sc.network.bandwidth_mbps * 1000.0)


def check_des_scenario(sc: Scenario) -> None:
    bad = [k for k in sc.adversaries.kinds if k not in DES_FAULTS] if (sc.adversaries.count or sc.adversaries.share) else []
    if bad:
        raise ScenarioError(f"the discrete-event model does not model {bad}; it models {', '.join(DES_FAULTS)}")
    if "equivocate" in sc.adversaries.kinds and not sc.des.gossip and (sc.adversaries.count or sc.adversaries.share):
        raise ScenarioError("adversaries.kinds equivocate needs des.gossip = true: equivocation is a gossiped commit")
    if sc.churn.joins:
        raise ScenarioError("churn.joins is not modelled by engine = \"des\" (use churn.kill or churn.rate_per_s: peers leave and rejoin)")
    if sc.network.mode != "loopback":
        raise ScenarioError("network.mode = \"netns\" applies to engine = \"processes\" only")


def build_world(sc: Scenario, pool: Any, rng: random.Random) -> World:
    from ..process_engine import plan_peers

    check_des_scenario(sc)
    world = World(sc, pool=pool, shards=[parse_range(s) for s in sc.model.shards])
    net = sc.network
    for plan in plan_peers(sc, rng):
        first, last = parse_range(plan.shard.split(":", 1)[1])
        speed = net.compute_ms_per_layer * math.exp(rng.gauss(0.0, net.compute_spread))
        peer = SimPeer(len(world.peers), world, first, last, plan.fault, speed, (rng.uniform(0, net.spread_ms), rng.uniform(0, net.spread_ms)),
                       collude=sc.adversaries.collude)
        peer.nid = rng.getrandbits(256)
        peer.hook = {"lie-after-trial": adv.LieAfterTrial(), "claims-fast": adv.ClaimsFast()}.get(plan.fault)
        world.peers.append(peer)
    world.by_nid = {p.nid: p for p in world.peers}
    build_tables(world, rng)
    place_providers(world)
    return world


def neighbours(local: int, ids: list[int], k: int, rng: random.Random) -> list[int]:
    """A converged routing table's contents: up to k random peers from every bucket of ``local``."""
    out: list[int] = []
    for b in range(255, -1, -1):
        other = ((local >> b) ^ 1) << b
        lo, hi = bisect_left(ids, other), bisect_left(ids, other + (1 << b))
        if hi > lo:
            out += [ids[i] for i in rng.sample(range(lo, hi), min(k, hi - lo))]
        base = (local >> b) << b
        if bisect_left(ids, base + (1 << b)) - bisect_left(ids, base) <= 1:
            break  # nobody else shares this prefix: the closer buckets are empty
    return out


def build_tables(world: World, rng: random.Random) -> None:
    ids = sorted(world.by_nid)
    k = world.sc.des.kademlia_k
    for peer in world.peers:
        peer.table = RoutingTable(peer.nid, k)
        for other in neighbours(peer.nid, ids, k, rng):
            peer.table.add(other)


def shard_key(first: int, last: int) -> int:
    return node_id(f"/p2p-infer/shard/{MODEL_ID}/{first}-{last}")


def place_providers(world: World) -> None:
    """Every provider announced its shard to the k nodes closest to the shard's key."""
    k = world.sc.des.kademlia_k
    for si, (first, last) in enumerate(world.shards):
        key = shard_key(first, last)
        providers = [p.index for p in world.peers if (p.first, p.last) == (first, last)]
        for nid in heapq.nsmallest(k, world.by_nid, key=lambda n: n ^ key):
            world.stores.setdefault(nid, {})[si] = providers
