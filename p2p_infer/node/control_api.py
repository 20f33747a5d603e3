"""The peer's local control API (``p2p-infer peer --api 127.0.0.1:PORT``): ``GET /status``
(JSON) and ``GET /metrics`` (Prometheus text), served by Starlette under hypercorn's trio
worker inside the peer's own nursery. Loopback only unless ``--api-public`` is given: it
has no authentication. ``p2p-infer status`` reads it (``cli_gateway.py``); docs/gateway.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from .. import __version__
from ..gateway.http import Bind, parse_bind, serve_asgi
from ..metrics import CONTENT_TYPE, Metrics, Snapshot

if TYPE_CHECKING:
    from ..config import Settings
    from .peer import Peer

DEFAULT_API = "127.0.0.1:8470"  # what `p2p-infer status` asks when given no --api


def api_bind(settings: Settings) -> Bind | None:
    """The validated ``--api`` address, before anything is loaded (ConfigError if refused)."""
    return parse_bind(settings.api, allow_public=settings.api_public) if settings.api else None


def peer_metrics(peer: Peer) -> Metrics:
    def snapshot() -> Snapshot:
        host = peer.host
        return Snapshot(sessions_open=len(peer.sessions.table.sessions), queue_depth=peer.scheduler.queued,
                        in_flight=peer.scheduler.in_flight,
                        connections=len(host.get_network().get_connections()) if host is not None else 0,
                        reputation=dict(peer.auditor.reputation.scores))

    return Metrics("peer", snapshot)


def status(peer: Peer) -> dict[str, Any]:
    """What ``GET /status`` answers: who this peer is, what it serves and how it is doing."""
    host = peer.host
    m = peer.metrics
    served = peer.shards.shards if peer.shards else []
    names = {mid: sm.name for mid, sm in (peer.shards.models.items() if peer.shards else [])}
    state = m.snapshot()
    return {
        "peer_id": peer.identity.peer_id,
        "version": __version__,
        "addrs": [str(a) for a in host.get_addrs()] if host is not None else [],
        "serving": [{"model": names.get(s.model_id, s.model_id), "model_id": s.model_id, "first": s.first, "last": s.last}
                    for s in served],
        "throughput": round(peer.throughput, 2),
        "uptime_s": round(m.uptime_s(), 1),
        "requests": {"served": m.served, "errors": m.errors, "by_protocol": m.by_code()},
        "forwards_served": peer.forward.forwards_served,
        "steps_served": peer.sessions.steps_served,
        "connections": state.connections,
        "sessions_open": state.sessions_open,
        "queue_depth": state.queue_depth,
        "in_flight": state.in_flight,
        "load": round(peer.load(), 3),
        "reputation_seen": state.reputation,
        "tee": peer.settings.tee,
    }


def app(peer: Peer) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def get_status(request: Request) -> JSONResponse:
        return JSONResponse(status(peer))

    async def get_metrics(request: Request) -> Response:
        return Response(peer.metrics.render(), media_type=CONTENT_TYPE)

    return Starlette(routes=[Route("/status", get_status), Route("/metrics", get_metrics)])


async def serve(peer: Peer, bind: Bind, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the control API in the peer's nursery; started with the URL it listens on."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, app(peer), bind)
        peer.log.info("control API listening", url=url)
        task_status.started(url)
