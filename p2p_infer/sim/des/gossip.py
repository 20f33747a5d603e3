"""Audit gossip in the discrete-event model: the consensus topic's messages, made by the real
codec (``round_message`` from each member after the commit deadline, the client's
``verdicts_message`` once per query, ``evidence_message`` for every verified fault), and
handed to real ``proto.auditor.Auditor`` instances. Topic v5: a member's rounds handed in
within one gossip delay (0.5 s, ``net.gossip.GOSSIP_DELAY``: a query's stages) go out as one
``rounds`` message (``committee_codec.batches``), as ``net/gossip.Gossip.publish_soon`` does,
and every subscriber handles each round it carries (``unbatch``). Clients audit only the
rounds of their own tasks (``Auditor.own_rounds_only``, as ``node/client.py``).

Who runs the auditor: every light client (its own auditor, with its reputation table: it
turns an equivocating member's gossiped commit and the one it was sent into evidence) and
``des.auditors`` sampled honest peers, each with its own reputation table (what a third
party learns from gossip alone). Their CPU time per message is measured as the code runs.
Everyone else is counted, not run: gossipsub with mesh degree D delivers each message to
every live peer, about D copies each (one kept, the rest duplicates), over ~log_D(N) hops.
At 10,000 peers running every peer's auditor on every message would be ~10^7 signature
checks; the sample's measured CPU per message stands for each of them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ...proto.auditor import Auditor, evidence_message
from ...proto.committee_codec import batches, unbatch
from ...proto.reputation import Reputation
from ...proto.wire import message_type
from .world import as_process

GOSSIP_DELAY_MS = 500.0  # as net.gossip.GOSSIP_DELAY: a node's rounds within it travel as one message


@dataclass
class Subscriber:
    name: str
    peer: Any  # the SimPeer (None for a client: always up)
    auditor: Auditor
    cpu_ms: float = 0.0
    observed: int = 0
    owner: Any = None  # the SimPeer or SimClient whose process this auditor runs in


@dataclass
class Gossip:
    world: Any
    loop: Any
    degree: int = 6
    subscribers: list[Subscriber] = field(default_factory=list)
    published: Counter[str] = field(default_factory=Counter)
    transmissions: int = 0
    bytes: int = 0
    evidence_found: Counter[str] = field(default_factory=Counter)  # by auditors from gossip alone
    batching: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sender -> rounds waiting for its flush
    rounds: int = 0  # round entries published (inside round and rounds messages)

    def add_peer_auditors(self, peers: list[Any]) -> None:
        for peer in peers:
            self.subscribers.append(Subscriber(f"peer{peer.index}", peer, Auditor(Reputation()), owner=peer))

    def add_client(self, client: Any) -> None:
        self.subscribers.append(Subscriber(f"client{client.index}", None, client.auditor, owner=client))

    def hops(self) -> int:
        return max(1, math.ceil(math.log(max(len(self.world.peers), 2)) / math.log(self.degree)))

    def publish_round(self, sender: str, message: dict[str, Any]) -> None:
        """A member's round: batched with its others handed in within GOSSIP_DELAY_MS."""
        self.rounds += 1
        pending = self.batching.setdefault(sender, [])
        pending.append(message)
        if len(pending) == 1:
            self.loop.after(GOSSIP_DELAY_MS, self.flush, sender)

    def flush(self, sender: str) -> None:
        for message in batches(self.batching.pop(sender, [])):
            self.publish(sender, message)

    def publish(self, sender: str, message: dict[str, Any]) -> None:
        n = len(self.world.peers)
        size = len(msgpack.packb(message, use_bin_type=True))
        self.published[message_type(message)] += 1
        self.transmissions += n * self.degree
        self.bytes += n * self.degree * size
        net = self.world.sc.network
        per_hop = net.base_latency_ms + 0.52 * net.spread_ms + self.world.transfer_ms(size) + net.per_message_ms  # mean distance in a square
        for sub in self.subscribers:
            if sub.peer is None or sub.peer.alive:
                self.loop.after(self.hops() * per_hop, self.deliver, sub, sender, message)

    def deliver(self, sub: Subscriber, sender: str, message: dict[str, Any]) -> None:
        with as_process(sub.owner):  # its own process: what it verified once, not what another auditor did
            started = time.perf_counter()
            evidence = [e for part in unbatch(message) for e in sub.auditor.observe(sender, part)]
            sub.cpu_ms += (time.perf_counter() - started) * 1000
        sub.observed += 1
        for item in evidence:  # found from gossip alone (equivocation, bad reveal): published for everyone
            self.evidence_found[item.kind] += 1
            self.publish(sub.name, evidence_message(item))

    def report(self, queries: int, roles: dict[str, str]) -> dict[str, Any]:
        peers = [s for s in self.subscribers if s.peer is not None]
        per_message = [s.cpu_ms / s.observed for s in peers if s.observed]
        views: dict[str, list[float]] = {}
        for sub in peers:
            for peer_id, role in roles.items():
                views.setdefault(role, []).append(sub.auditor.reputation.of(peer_id))
        total = sum(self.published.values())
        return {
            "published": dict(self.published), "round_entries": self.rounds, "transmissions": self.transmissions, "bytes": self.bytes,
            "published_per_query": {k: round(v / max(queries, 1), 2) for k, v in sorted(self.published.items())},
            "mesh_degree": self.degree, "hops": self.hops(),
            "transmissions_per_query": round(self.transmissions / max(queries, 1), 1),
            "messages_per_peer_per_query": round(self.transmissions / max(queries, 1) / max(len(self.world.peers), 1), 2),
            "auditors": len(peers),
            "audit_cpu_ms_per_message": round(sum(per_message) / len(per_message), 3) if per_message else None,
            "audit_cpu_ms_per_peer_per_query": round(sum(s.cpu_ms for s in peers) / len(peers) / max(queries, 1), 3) if peers else None,
            "messages_per_auditor": round(sum(s.observed for s in peers) / len(peers), 1) if peers else 0,
            "evidence_found_by_auditors": dict(self.evidence_found),
            "auditor_reputation": {r: round(sum(v) / len(v), 3) for r, v in sorted(views.items()) if v} if total else {},
        }
