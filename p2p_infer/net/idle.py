"""Closing idle connections: a connection with no open stream, on which no stream was opened
for ``conn_idle_timeout`` seconds, is closed.

py-libp2p 0.8.1 has no idle timeout, and its connection pruner (high watermark, grace period)
runs only when a new connection is added; once ``max_connections`` is reached new inbound
connections are refused before they are added, so it never runs again and idle connections
hold every slot (issue 10: 200 identities that opened nothing stayed connected). This loop
closes idle connections itself and also runs the library's pruner on a timer, the way
go-libp2p's connection manager trims in the background.

A connection counts as active while a stream whose protocol was negotiated is open on it,
gossipsub's long-lived one included (gossip mesh links are wanted). Streams still in
protocol negotiation do not count: our own identify stream to a stranger that never
answers would otherwise keep the stranger's connection forever. Residual risk: a stranger that keeps one stream open
(ping, or gossipsub) keeps its connection; ``max_connections`` and the per-peer limits
bound what that costs.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio
from libp2p.abc import IHost, INetStream, INetwork

from .notify import Notifee

log = structlog.get_logger("p2p_infer.idle")


class _Activity(Notifee):
    """Stamps the time a stream opens, per remote peer (one connection per peer: we dial with
    ``max_connections_per_peer=1``). Short-lived streams (DHT RPCs) are seen here even when
    they open and close between two scans."""

    def __init__(self) -> None:
        self.last_stream: dict[str, float] = {}

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        try:
            self.last_stream[str(stream.muxed_conn.peer_id)] = trio.current_time()
        except Exception:
            pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        try:
            self.last_stream[str(stream.muxed_conn.peer_id)] = trio.current_time()
        except Exception:
            pass


async def _close(conn: Any) -> None:
    with trio.move_on_after(2):
        try:
            await conn.close()
        except Exception as exc:
            log.debug("closing an idle connection failed", error=f"{type(exc).__name__}: {exc}")


class IdleReaper:
    def __init__(self, host: IHost, idle_timeout: float) -> None:
        self.host = host
        self.idle_timeout = idle_timeout
        self.activity = _Activity()
        self.first_seen: dict[int, float] = {}  # id(conn) -> when this loop first saw it
        self.closed = 0
        host.get_network().register_notifee(self.activity)

    def _idle_for(self, conn: Any, now: float) -> float:
        if any(stream.get_protocol() for stream in conn.get_streams()):
            return 0.0
        peer = str(conn.muxed_conn.peer_id)
        since = max(self.first_seen.setdefault(id(conn), now), self.activity.last_stream.get(peer, 0.0))
        return now - since

    async def sweep(self) -> int:
        """Close every connection idle for the timeout; return how many."""
        now = trio.current_time()
        conns = list(self.host.get_network().get_connections())
        live = {id(c) for c in conns}
        self.first_seen = {k: v for k, v in self.first_seen.items() if k in live}
        peers = {str(c.muxed_conn.peer_id) for c in conns}
        self.activity.last_stream = {p: t for p, t in self.activity.last_stream.items() if p in peers}  # bounded
        idle = [c for c in conns if not c.is_closed and self._idle_for(c, now) >= self.idle_timeout]
        async with trio.open_nursery() as nursery:  # at once: a close can wait on a silent remote
            for conn in idle:
                nursery.start_soon(_close, conn)
        if idle:
            self.closed += len(idle)
            log.info("idle connections closed", closed=len(idle), open=len(conns) - len(idle), idle_timeout=self.idle_timeout)
        return len(idle)

    async def run(self) -> None:
        pruner = getattr(self.host.get_network(), "connection_pruner", None)
        while True:
            await trio.sleep(min(5.0, self.idle_timeout / 4))
            try:
                await self.sweep()
                if pruner is not None:
                    await pruner.maybe_prune_connections()
            except Exception:  # a bug here must not end the peer
                log.exception("idle connection sweep failed")
