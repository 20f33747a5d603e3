"""Route finding: the least-expected-latency chain of peers covering a range of layers.

Sans-IO, as Petals' min-latency Dijkstra: nodes are layer positions (``p`` = the next
layer to run), and a server that holds layers ``[first, last]`` gives an edge from every
``p`` in its range to every ``q + 1`` with ``p <= q <= last``, costing its round trip plus
its compute time for those layers, scaled up by its load. Servers with a reputation
under the threshold, or excluded after a failure, are left out; with ``require_tee`` so is
every server without a verified attestation (``Server.attested``), and the error says how
many attested providers there were.

The throughput a route is planned with is the client's own measurement
(:class:`ThroughputBook`), never what a peer claims: issue 9's liar advertised 1e9
layers/s in its record and won every route. A claim only ever *lowers* the estimate of a
peer the client has not timed yet.
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from ..bounded import trim_oldest
from ..errors import NoRoute

DEFAULT_RTT_MS = 5.0  # assumed for a server not measured yet


@dataclass(frozen=True)
class Server:
    peer_id: str
    first: int
    last: int
    throughput: float  # layer forwards per second: measured by the client (ThroughputBook.effective)
    load: float = 0.0
    rtt_ms: float | None = None  # measured by the client; None = not yet
    attested: bool = False  # its record's TEE attestation verified, and is fresh (net/directory.py)


@dataclass(frozen=True)
class Segment:
    server: Server
    first: int
    last: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


def segment_cost_ms(server: Server, n_layers: int) -> float:
    compute = 1000.0 * n_layers / server.throughput if server.throughput > 0 else 100.0 * n_layers
    rtt = DEFAULT_RTT_MS if server.rtt_ms is None else server.rtt_ms
    return rtt + compute * (1.0 + server.load)


def plan_route(
    servers: Collection[Server],
    first: int,
    last: int,
    *,
    exclude: Collection[str] = (),
    reputation: Callable[[str], float] = lambda _peer: 1.0,
    min_reputation: float = 0.0,
    model_name: str = "",
    whole_shards: bool = False,
    require_tee: bool = False,
) -> list[Segment]:
    """Cheapest chain of segments running layers ``first..last`` in order.

    Reputation divides nothing by default; below ``min_reputation`` a server is skipped,
    and above it cost is scaled by ``1 / reputation`` (R in [0.1, 10]), so trusted peers win
    ties. Raises :class:`NoRoute` naming the first layer no usable server covers. With
    ``whole_shards`` a server runs exactly its whole range (a ZK circuit covers a shard);
    with ``require_tee`` only attested servers are used.
    """
    usable = [s for s in servers if s.peer_id not in exclude and reputation(s.peer_id) >= min_reputation
              and (s.attested or not require_tee)]
    end = last + 1
    best: dict[int, float] = {first: 0.0}
    back: dict[int, tuple[int, Segment]] = {}
    queue: list[tuple[float, int]] = [(0.0, first)]
    while queue:
        cost, pos = heapq.heappop(queue)
        if pos == end:
            break
        if cost > best.get(pos, float("inf")):
            continue
        for server in usable:
            if not server.first <= pos <= server.last or (whole_shards and (pos != server.first or server.last > last)):
                continue
            weight = 1.0 / max(reputation(server.peer_id), 1e-6)
            stops = [server.last] if whole_shards else range(pos, min(server.last, last) + 1)
            for stop in stops:
                nxt = stop + 1
                new_cost = cost + segment_cost_ms(server, stop - pos + 1) * weight
                if new_cost < best.get(nxt, float("inf")):
                    best[nxt] = new_cost
                    back[nxt] = (pos, Segment(server, pos, stop))
                    heapq.heappush(queue, (new_cost, nxt))
    if end not in best:
        reached = max(best)
        if require_tee:
            attested = {s.peer_id for s in servers if s.attested}
            at_stage = {s.peer_id for s in usable if s.first <= reached <= s.last}
            raise NoRoute(f"--require-tee: no attested peer serves layer {reached} of {model_name or 'the model'} "
                          f"(stage from layer {reached}: {len(at_stage)} attested provider(s); "
                          f"{len(attested)} attested provider(s) of the model in all)")
        raise NoRoute(f"no live peer serves layer {reached} of {model_name or 'the model'} (layers {first}-{last} needed)")
    route: list[Segment] = []
    pos = end
    while pos != first:
        pos, segment = back[pos]
        route.append(segment)
    return route[::-1]


def route_cost_ms(route: list[Segment]) -> float:
    return sum(segment_cost_ms(s.server, s.last - s.first + 1) for s in route)


# ---- throughput the client measured ----

MAX_SAMPLES = 16  # per peer: the median of the latest ones, so one slow or lucky request moves nothing
MAX_MEASURED_PEERS = 4096
MIN_COMPUTE_MS = 0.05  # a reply faster than the ping is measurement noise, not infinite speed


@dataclass
class ThroughputBook:
    """Layers per second per peer, from the client's own timed requests (live hops, spot
    checks and trials alike: a peer cannot tell them apart, so it cannot be fast only when timed)."""

    samples: dict[str, deque[float]] = field(default_factory=dict)

    def observe(self, peer_id: str, layers: int, elapsed_ms: float, rtt_ms: float | None = None) -> None:
        """One request for ``layers`` layers answered ``elapsed_ms`` after it was sent; the
        round trip measured by ping (when known) is the network's share of that."""
        compute_ms = max(elapsed_ms - (rtt_ms or 0.0), MIN_COMPUTE_MS)
        window = self.samples.pop(peer_id, None) or deque(maxlen=MAX_SAMPLES)
        window.append(1000.0 * max(layers, 1) / compute_ms)
        self.samples[peer_id] = window  # most recently measured last; the oldest are forgotten first
        trim_oldest(self.samples, MAX_MEASURED_PEERS)

    def measured(self, peer_id: str) -> float | None:
        window = self.samples.get(peer_id)
        return statistics.median(window) if window else None

    def effective(self, claims: Mapping[str, float]) -> dict[str, float]:
        """The throughput to route each peer of ``claims`` (peer -> advertised) with: its
        measured median; for a peer not timed yet, its claim capped at the median of the
        measured peers (or, when none is, the median claim), so it can never outrank
        measured peers by saying so, while an honest "I am slow" still counts."""
        medians = [m for m in (self.measured(p) for p in claims) if m is not None]
        positive = [c for c in claims.values() if c > 0]
        reference = statistics.median(medians) if medians else statistics.median(positive) if positive else 1.0
        out = {}
        for peer, claim in claims.items():
            mine = self.measured(peer)
            out[peer] = mine if mine is not None else min(claim, reference) if claim > 0 else reference
        return out
