"""What a host grants each remote peer: streams, request bytes in flight, request rate, and
a global memory budget for frames, on top of py-libp2p's resource manager (``libp2p.rcmgr``).

What py-libp2p 0.8.1 enforces, and we configure (:func:`resource_manager`): connections in
total and per peer, pending handshakes, a per-peer connection rate, the global stream count,
and the memory accounting (``acquire_memory``) we use as the frame budget. What it lacks,
and this module adds: its scoped per-peer stream limits are not wired into the swarm (the
swarm only calls the global ``acquire_stream``; calling ``acquire_scoped_stream`` ourselves
would count every stream twice against the global limit), and it has no per-peer memory
scope, so per-peer streams and request bytes are counted here. Request rate uses rcmgr's
token-bucket ``RateLimiter``.

Every refusal is :class:`~p2p_infer.errors.Overloaded` (retryable): the framing loop turns
it into an ``overloaded`` reply before reading the refused frame's payload.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import structlog
import trio
from libp2p.peer.id import ID
from libp2p.rcmgr import ResourceLimits, ResourceManager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.rcmgr.rate_limiter import RateLimitConfig, RateLimiter, RateLimitScope, RateLimitStrategy

from ..bounded import trim_oldest
from ..config import MIB, Limits
from ..errors import Overloaded

log = structlog.get_logger("p2p_infer.limits")
MAX_TRACKED_PEERS = 4096  # rate-limit buckets kept (least recently used forgotten first)


def resource_manager(limits: Limits) -> ResourceManager:
    """py-libp2p's resource manager with our limits. Graceful degradation is off: it shrinks
    every limit by up to half whenever one is exhausted, so a flood would cost honest peers
    capacity long after it stopped. The circuit breaker stays (it only trips on internal
    errors), metrics and the memory pool are off (nothing reads them)."""
    return ResourceManager(
        limits=ResourceLimits(
            max_connections=limits.max_connections,
            max_memory_mb=max(1, limits.frame_memory_budget // MIB),
            max_streams=limits.max_connections * limits.max_streams_per_peer,
        ),
        connection_limits=ConnectionLimits(
            max_pending_inbound=64,  # Noise handshakes under way at once
            max_established_inbound=limits.max_connections,
            max_established_outbound=limits.max_connections,
            max_established_per_peer=2,  # we dial with max_connections_per_peer=1; simultaneous dials make 2
            max_established_total=limits.max_connections,
        ),
        enable_metrics=False,
        enable_graceful_degradation=False,
        enable_memory_pooling=False,
        enable_rate_limiting=True,  # connections per peer: 10/s, burst 50 (rcmgr's defaults)
    )


@dataclass
class Reservation:
    """Bytes of one frame held against the peer's and the global budget until released.
    ``keep()`` hands ownership to background work (forwarding) that outlives the reply."""

    guard: Guard
    peer: str
    size: int
    kept: bool = False
    released: bool = False

    def keep(self) -> Reservation:
        self.kept = True
        return self

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.guard._release(self.peer, self.size)

    def release_unless_kept(self) -> None:
        if not self.kept:
            self.release()


@dataclass
class Guard:
    """Per-remote-peer accounting for one host's p2p-infer protocols."""

    limits: Limits = field(default_factory=Limits)
    rcmgr: ResourceManager | None = None
    streams: Counter[str] = field(default_factory=Counter)
    request_bytes: Counter[str] = field(default_factory=Counter)
    read_tokens: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (bytes, when)
    rate: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        per_second = self.limits.requests_per_second_per_peer
        self.rate = RateLimiter(RateLimitConfig(
            strategy=RateLimitStrategy.TOKEN_BUCKET, scope=RateLimitScope.PER_PEER,
            refill_rate=per_second, capacity=2 * per_second, initial_tokens=2 * per_second,
            max_peers=MAX_TRACKED_PEERS, enable_monitoring=False,  # monitoring keeps 1,000 samples per peer
        ))

    async def pace(self, peer: str, nbytes: int) -> None:
        """Hold a reader of ``peer``'s frames to the peer's byte rate (a token bucket with a
        burst of one second). While it waits, nothing reads the stream, yamux grants no more
        window, and the sender stops: a flood then costs the event loop (and its GIL, which
        the compute threads need) no more than the rate, however hard the sender pushes."""
        rate = self.limits.read_bytes_per_second_per_peer
        now = time.monotonic()
        tokens, last = self.read_tokens.get(peer, (float(rate), now))
        tokens = min(float(rate), tokens + (now - last) * rate) - nbytes
        self.read_tokens[peer] = (tokens, now)
        trim_oldest(self.read_tokens, MAX_TRACKED_PEERS)
        if tokens < 0:
            await trio.sleep(-tokens / rate)

    def open_stream(self, peer: str) -> None:
        if self.streams[peer] >= self.limits.max_streams_per_peer:
            raise Overloaded(f"{self.streams[peer]} streams already open from this peer (limit {self.limits.max_streams_per_peer})")
        self.streams[peer] += 1

    def close_stream(self, peer: str) -> None:
        self.streams[peer] -= 1
        if self.streams[peer] <= 0:
            del self.streams[peer]

    def admit_request(self, peer: str) -> None:
        """One request from ``peer``: within its rate, or Overloaded."""
        try:
            pid = ID.from_base58(peer)
        except Exception:
            pid = None
        if pid is not None and not self.rate.try_allow(peer_id=pid):
            raise Overloaded(f"more than {self.limits.requests_per_second_per_peer:g} requests per second from this peer")

    def reserve(self, peer: str, size: int) -> Reservation:
        """Hold ``size`` bytes of a frame announced by ``peer`` before reading it."""
        held = self.request_bytes[peer]
        if held + size > self.limits.max_request_bytes_per_peer:
            raise Overloaded(f"this peer already has {held} request bytes in flight "
                             f"(limit {self.limits.max_request_bytes_per_peer}); frame of {size} refused")
        if self.rcmgr is not None and not self.rcmgr.acquire_memory(size):
            raise Overloaded(f"frame memory budget ({self.limits.frame_memory_budget} bytes) is in use; frame of {size} refused")
        self.request_bytes[peer] += size
        return Reservation(self, peer, size)

    def _release(self, peer: str, size: int) -> None:
        if self.rcmgr is not None:
            self.rcmgr.release_memory(size)
        self.request_bytes[peer] -= size
        if self.request_bytes[peer] <= 0:
            del self.request_bytes[peer]

    def stats(self) -> dict[str, int]:
        return {"streams": sum(self.streams.values()), "request_bytes": sum(self.request_bytes.values()),
                "peers": len(self.streams)}
