"""Route finding: the least-expected-latency chain of peers covering a range of layers.

Sans-IO, as Petals' min-latency Dijkstra: nodes are layer positions (``p`` = the next
layer to run), and a server that holds layers ``[first, last]`` gives an edge from every
``p`` in its range to every ``q + 1`` with ``p <= q <= last``, costing its round trip plus
its compute time for those layers, scaled up by its load. Servers with a reputation
under the threshold, or excluded after a failure, are left out.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..errors import NoRoute

DEFAULT_RTT_MS = 5.0  # assumed for a server not measured yet


@dataclass(frozen=True)
class Server:
    peer_id: str
    first: int
    last: int
    throughput: float  # layer forwards per second (advertised)
    load: float = 0.0
    rtt_ms: float | None = None  # measured by the client; None = not yet


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
) -> list[Segment]:
    """Cheapest chain of segments running layers ``first..last`` in order.

    Reputation divides nothing by default; below ``min_reputation`` a server is skipped,
    and above it cost is scaled by ``1 / reputation`` (R in [0.1, 10]), so trusted peers win
    ties. Raises :class:`NoRoute` naming the first layer no usable server covers. With
    ``whole_shards`` a server runs exactly its whole range (a ZK circuit covers a shard).
    """
    usable = [s for s in servers if s.peer_id not in exclude and reputation(s.peer_id) >= min_reputation]
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
        raise NoRoute(f"no live peer serves layer {reached} of {model_name or 'the model'} (layers {first}-{last} needed)")
    route: list[Segment] = []
    pos = end
    while pos != first:
        pos, segment = back[pos]
        route.append(segment)
    return route[::-1]


def route_cost_ms(route: list[Segment]) -> float:
    return sum(segment_cost_ms(s.server, s.last - s.first + 1) for s in route)
