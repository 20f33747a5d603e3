"""Kademlia, sans-IO: XOR distance, a k-bucket routing table, and the iterative lookup as
a query iterator handed ``now`` that says whom to ask next and never sends.

In the style of rust-libp2p's ``ClosestPeersIter``: the driver calls :meth:`Lookup.next`
for the peers to ask (at most ``alpha`` in flight), feeds back each answer
(:meth:`Lookup.on_response` with the closer peers it named) or failure, and calls
:meth:`Lookup.poll` to expire peers past their deadline. The lookup is finished when the
``k`` closest peers it knows of that did not fail have all answered. Node ids are ints
(the 256-bit SHA-256 of a peer id in libp2p); peers a response names are added at one
hop more than the responder, so :attr:`Lookup.hops` is how deep the answer was found.
py-libp2p's own DHT does the I/O in the real network (``net/dht.py``); this module is what
the discrete-event simulator drives, and a reference for the rules.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

ID_BITS = 256
K = 20
ALPHA = 3
TIMEOUT_S = 3.0  # per-peer query timeout (notes/libp2p.md: cut from py-libp2p's 10 s)


def node_id(peer: str | bytes) -> int:
    """A peer's position on the ring: SHA-256 of its id, as libp2p's Kademlia keys it."""
    raw = peer.encode() if isinstance(peer, str) else peer
    return int.from_bytes(hashlib.sha256(raw).digest(), "big")


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(local: int, other: int) -> int:
    """Which k-bucket of ``local`` holds ``other``: the highest differing bit (-1 for itself)."""
    return (local ^ other).bit_length() - 1


@dataclass
class RoutingTable:
    """k-buckets: at most ``k`` peers per distance range; a full bucket keeps its old peers
    (Kademlia prefers peers that stayed up), a removed one frees its slot."""

    local: int
    k: int = K
    buckets: dict[int, list[int]] = field(default_factory=dict)

    def add(self, peer: int) -> bool:
        index = bucket_index(self.local, peer)
        if index < 0:
            return False
        bucket = self.buckets.setdefault(index, [])
        if peer in bucket or len(bucket) >= self.k:
            return False
        bucket.append(peer)
        return True

    def remove(self, peer: int) -> None:
        bucket = self.buckets.get(bucket_index(self.local, peer))
        if bucket and peer in bucket:
            bucket.remove(peer)

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def closest(self, target: int, n: int) -> list[int]:
        return heapq.nsmallest(n, (p for b in self.buckets.values() for p in b), key=lambda p: p ^ target)


class PeerState(enum.Enum):
    NOT_CONTACTED = "not-contacted"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class _Entry:
    state: PeerState
    depth: int
    deadline: float = 0.0


class Lookup:
    """An iterative FIND_NODE / GET_PROVIDERS towards ``target``."""

    def __init__(self, target: int, seeds: Iterable[int], *, k: int = K, alpha: int = ALPHA, timeout: float = TIMEOUT_S,
                 exclude: Iterable[int] = ()) -> None:
        self.target, self.k, self.alpha, self.timeout = target, k, alpha, timeout
        self.peers: dict[int, _Entry] = {}
        self.excluded = set(exclude)  # the asking node itself
        self.contacted = 0
        for peer in seeds:
            self._learn(peer, 1)

    def _learn(self, peer: int, depth: int) -> None:
        if peer not in self.peers and peer not in self.excluded:
            self.peers[peer] = _Entry(PeerState.NOT_CONTACTED, depth)

    def _closest_live(self) -> list[tuple[int, _Entry]]:
        live = ((p, e) for p, e in self.peers.items() if e.state is not PeerState.FAILED)
        return heapq.nsmallest(self.k, live, key=lambda pe: pe[0] ^ self.target)

    @property
    def waiting(self) -> int:
        return sum(1 for e in self.peers.values() if e.state is PeerState.WAITING)

    @property
    def finished(self) -> bool:
        return all(e.state is PeerState.SUCCEEDED for _, e in self._closest_live())

    def next(self, now: float) -> list[int]:
        """The peers to ask now (marked waiting until ``now + timeout``); [] when finished or at ``alpha`` in flight."""
        free = self.alpha - self.waiting
        out: list[int] = []
        if free <= 0:
            return out
        for peer, entry in self._closest_live():
            if entry.state is PeerState.NOT_CONTACTED:
                entry.state, entry.deadline = PeerState.WAITING, now + self.timeout
                self.contacted += 1
                out.append(peer)
                if len(out) == free:
                    break
        return out

    def on_response(self, peer: int, closer: Iterable[int], now: float) -> None:
        entry = self.peers.get(peer)
        if entry is None or entry.state is not PeerState.WAITING:
            return  # unsolicited, or answered after we gave up on it
        entry.state = PeerState.SUCCEEDED
        for other in closer:
            self._learn(other, entry.depth + 1)

    def on_failure(self, peer: int, now: float) -> None:
        entry = self.peers.get(peer)
        if entry is not None and entry.state is PeerState.WAITING:
            entry.state = PeerState.FAILED

    def poll(self, now: float) -> None:
        for entry in self.peers.values():
            if entry.state is PeerState.WAITING and entry.deadline <= now:
                entry.state = PeerState.FAILED

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self.peers.values() if e.state is PeerState.WAITING), default=None)

    def closest(self) -> list[int]:
        """The k closest peers that answered, nearest first."""
        done = ((p, e) for p, e in self.peers.items() if e.state is PeerState.SUCCEEDED)
        return [p for p, _ in heapq.nsmallest(self.k, done, key=lambda pe: pe[0] ^ self.target)]

    @property
    def hops(self) -> int:
        """Depth of the closest peer that answered: 1 = a seed knew the answer."""
        best = self.closest()
        return self.peers[best[0]].depth if best else 0
