"""Run the gateway: one long-lived light client, warmed up, then the HTTP app beside it in
one trio nursery (hypercorn's trio worker)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from . import schemas
from .http import Bind, serve_asgi

log = structlog.get_logger("p2p_infer.gateway")


async def run_gateway(bootstrap: Sequence[str], bind: Bind, *, unverified: bool = False, ready_file: Path | None = None,
                      client_options: dict[str, Any] | None = None,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``nursery.start`` returns the gateway's URL."""
    from ..node.client import Client
    from .app import build_app
    from .service import Gateway

    async with Client(bootstrap, **(client_options or {})) as client:
        for name in (schemas.EMBEDDING_MODEL, schemas.CHAT_MODEL):  # load once, before the first request waits on it
            await client.model(name)
        gateway = Gateway(client, unverified=unverified)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_asgi, build_app(gateway), bind)
            if ready_file is not None:
                tmp = ready_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"url": url, "peer_id": client.identity.peer_id, "pid": os.getpid()}))
                os.replace(tmp, ready_file)
            log.info("gateway listening", url=url, peer=client.identity.peer_id,
                     verification="UNVERIFIED (--unverified)" if unverified else "verified by default")
            task_status.started(url)
