"""The gateway's ASGI app (Starlette): the OpenAI-compatible endpoints, ``/health``,
``/metrics``, the health page ``/`` and the JSON it reads (``/api/network``). Every error
is answered in OpenAI's format, ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog

from ..errors import InvalidApiRequest, P2PInferError
from ..metrics import CONTENT_TYPE
from . import schemas

if TYPE_CHECKING:
    from .service import Gateway

log = structlog.get_logger("p2p_infer.gateway")
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/embeddings", "/v1/chat/completions", "/api/network")


class CountRequests:
    """ASGI middleware: one count per HTTP request, by route, method and status (streams are
    timed to their last byte)."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app = app
        self.metrics = gateway.metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, seen = time.perf_counter(), {"status": 500, "in": 0, "out": 0}

        async def counted_receive() -> dict[str, Any]:
            message = await receive()
            seen["in"] += len(message.get("body", b""))
            return message  # type: ignore[no-any-return]

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.observe(route, scope["method"], str(seen["status"]), time.perf_counter() - started, seen["in"], seen["out"])


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _body(request: Any) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise InvalidApiRequest("the request body is not valid JSON") from None


def _gw(request: Any) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def embeddings(request: Any) -> Any:
    from starlette.responses import JSONResponse

    started = time.perf_counter()
    answer = await _gw(request).embeddings(schemas.parse_embeddings(await _body(request)))
    took = (time.perf_counter() - started) * 1000  # what the gateway spent, without HTTP transport (bench/)
    return JSONResponse(answer, headers={"server-timing": f"app;dur={took:.2f}"})


async def chat(request: Any) -> Any:
    from starlette.responses import JSONResponse, StreamingResponse

    gateway = _gw(request)
    req = schemas.parse_chat(await _body(request))
    if not req.stream:
        return JSONResponse(await gateway.chat(req))
    chunks = gateway.chat_stream(req)
    primed = [await chunks.__anext__(), await chunks.__anext__()]  # errors before the first token get their HTTP status

    async def events() -> AsyncIterator[bytes]:
        try:
            for c in primed:
                yield _sse(c)
            async for c in chunks:
                yield _sse(c)
            yield _sse("[DONE]")
        except P2PInferError as exc:  # too late for a status: OpenAI's in-stream error event
            yield _sse(schemas.error_of(exc)[1])

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def models(request: Any) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(_gw(request).models())


async def health(request: Any) -> Any:
    from starlette.responses import JSONResponse

    status, body = _gw(request).health()
    return JSONResponse(body, status_code=status)


async def metrics(request: Any) -> Any:
    from starlette.responses import Response

    return Response(_gw(request).metrics.render(), media_type=CONTENT_TYPE)


async def network(request: Any) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(_gw(request).network())


async def page(request: Any) -> Any:
    from starlette.responses import HTMLResponse

    return HTMLResponse(resources.files(__package__).joinpath("health.html").read_text())


async def on_ours(request: Any, exc: Exception) -> Any:
    from starlette.responses import JSONResponse

    assert isinstance(exc, P2PInferError)
    log.info("request failed", path=request.url.path, code=exc.code, reason=exc.message)
    status, body = schemas.error_of(exc)
    return JSONResponse(body, status_code=status)


async def on_http(request: Any, exc: Exception) -> Any:
    from starlette.responses import JSONResponse

    status = getattr(exc, "status_code", 500)
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse(schemas.error_body(f"{request.method} {request.url.path}: {getattr(exc, 'detail', exc)}", kind, str(status)),
                        status_code=status)


async def on_bug(request: Any, exc: Exception) -> Any:
    from starlette.responses import JSONResponse

    log.exception("gateway handler failed", path=request.url.path)
    return JSONResponse(schemas.error_body(f"internal error: {type(exc).__name__}", "server_error", "internal"), status_code=500)


def build_app(gateway: Gateway) -> Any:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    app = Starlette(routes=[
        Route("/", page), Route("/health", health), Route("/metrics", metrics), Route("/api/network", network),
        Route("/v1/models", models), Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ], exception_handlers={P2PInferError: on_ours, HTTPException: on_http, Exception: on_bug})
    app.state.gateway = gateway
    return CountRequests(app, gateway)
