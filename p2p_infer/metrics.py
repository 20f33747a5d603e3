"""Prometheus metrics: every metric this package exports is defined here, once.

Each process (a peer, a gateway) builds one :class:`Metrics` on its own
``CollectorRegistry``, never prometheus_client's global one, so several nodes in one
process (tests) do not clash. Request counters and latency histograms are updated by one
call per request (:meth:`Metrics.observe`, or :meth:`Metrics.counted` around a protocol
handler); gauges that describe the node's state (sessions open, queue depth, connections,
reputation seen) are read from a snapshot function at scrape time, so nothing has to keep
them in step.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import P2PInferError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from sub-millisecond pings to multi-second generations
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class Snapshot:
    """The node's state at scrape time (what :class:`Metrics` turns into gauges)."""

    sessions_open: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    connections: int = 0
    reputation: dict[str, float] = field(default_factory=dict)  # peer id -> reputation this node holds


def payload_bytes(obj: Any) -> int:
    """About a message's msgpack size without encoding it again: its bytes and strings
    (tensors dominate) plus one byte per other value."""
    if isinstance(obj, (bytes, bytearray, memoryview, str)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj) + 1
    return 1


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], role: str) -> None:
        self.snapshot = snapshot
        self.role = role

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.snapshot()
        for name, doc, value in (
            ("p2p_infer_sessions_open", "Generation sessions (KV caches) open", s.sessions_open),
            ("p2p_infer_queue_depth", "Compute requests waiting for a slot", s.queue_depth),
            ("p2p_infer_in_flight", "Compute requests running or waiting", s.in_flight),
            ("p2p_infer_connections", "libp2p connections open", s.connections),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        rep = GaugeMetricFamily("p2p_infer_reputation", "Reputation this node holds of a peer (R in [0.1, 10])", labels=["peer"])
        for peer, value in sorted(s.reputation.items()):
            rep.add_metric([peer], value)
        yield rep


class Metrics:
    """One process's metrics on its own registry; ``role`` is ``peer`` or ``gateway``."""

    def __init__(self, role: str, snapshot: Callable[[], Snapshot] | None = None) -> None:
        self.role = role
        self.started = time.time()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("p2p_infer_requests", "Requests handled, by protocol (or endpoint), message type and result code",
                                ["protocol", "type", "code"], registry=r)
        self.latency = Histogram("p2p_infer_request_seconds", "Time to answer a request, by protocol (or endpoint)",
                                 ["protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("p2p_infer_received_bytes", "Request payload bytes received (about the msgpack size)",
                                ["protocol"], registry=r)
        self.bytes_out = Counter("p2p_infer_sent_bytes", "Reply payload bytes sent (about the msgpack size)", ["protocol"], registry=r)
        self.snapshot = snapshot or Snapshot
        if snapshot is not None:
            r.register(_StateCollector(snapshot, role))
        self.served = 0
        self.errors = 0

    def uptime_s(self) -> float:
        return time.time() - self.started

    def observe(self, protocol: str, kind: str, code: str, seconds: float, received: int = 0, sent: int = 0) -> None:
        """Count one request: its protocol, message type, result code ("ok" or an error code)."""
        self.requests.labels(protocol, kind, code).inc()
        self.latency.labels(protocol).observe(seconds)
        if received:
            self.bytes_in.labels(protocol).inc(received)
        if sent:
            self.bytes_out.labels(protocol).inc(sent)
        self.served += 1
        if code != "ok":
            self.errors += 1

    def counted(self, protocol: str, handle: Handler) -> Handler:
        """``handle`` with each request counted (the framing loop turns its errors into replies)."""

        async def counted_handle(message: dict[str, Any]) -> dict[str, Any]:
            started, code, reply = time.perf_counter(), "cancelled", None
            try:
                reply = await handle(message)
                code = str(reply.get("code", "error")) if reply.get("type") == "error" else "ok"
                return reply
            except P2PInferError as exc:
                code = exc.code
                raise
            except Exception:
                code = "internal"
                raise
            finally:
                self.observe(protocol, str(message.get("type", "?")), code, time.perf_counter() - started,
                             payload_bytes(message), payload_bytes(reply) if reply is not None else 0)

        return counted_handle

    def by_code(self) -> dict[str, dict[str, int]]:
        """Requests counted so far: protocol -> code -> count (for /status)."""
        out: dict[str, dict[str, int]] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    proto, code = sample.labels["protocol"], sample.labels["code"]
                    out.setdefault(proto, {})[code] = out.get(proto, {}).get(code, 0) + int(sample.value)
        return out

    def render(self) -> bytes:
        return generate_latest(self.registry)
