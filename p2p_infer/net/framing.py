"""Length-prefixed msgpack messages on libp2p streams: the one framing every protocol uses.

A frame is a 4-byte big-endian payload length followed by a msgpack map with a string
``type``. Frames larger than the reader's limit are refused before they are read, and
every read has a deadline, so a slow or hostile sender cannot pin a handler. A failed
request gets an ``{"type": "error", "code": ..., "message": ...}`` reply. The full rules
are in ``protocols/framing.md``.

``encode_frame``/``decode_payload`` are sans-IO; ``read_message``/``write_message`` and
``serve_stream`` adapt them to any stream with ``read(n)``/``write(b)``/``close()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Protocol

import msgpack
import structlog
import trio

from ..errors import FrameError, FrameTooLarge, P2PInferError, ProtocolViolation, RemoteError
from ..proto.wire import Message

HEADER_BYTES = 4
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 30.0

log = structlog.get_logger("p2p_infer.framing")
remote_peer: ContextVar[str] = ContextVar("remote_peer", default="")  # set while a handler runs


class Stream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...


def encode_frame(message: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > max_frame:
        raise FrameTooLarge(f"message of {len(payload)} bytes exceeds the {max_frame}-byte frame limit")
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


def decode_length(header: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> int:
    length = int.from_bytes(header, "big")
    if length > max_frame:
        raise FrameTooLarge(f"peer announced a {length}-byte frame, limit is {max_frame}")
    return length


def decode_payload(payload: bytes) -> Message:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ExtraData, FormatError, ValueError, ...
        raise FrameError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolViolation("a message must be a map with a string 'type'")
    return message


def error_message(error: P2PInferError) -> Message:
    return {"type": "error", "code": error.code, "message": error.message}


def raise_if_error(message: Message, peer: str = "") -> Message:
    """Turn an error reply into :class:`RemoteError`; return any other message."""
    if message["type"] == "error":
        raise RemoteError(str(message.get("code", "internal")), str(message.get("message", "")), peer)
    return message


async def _read_exact(stream: Stream, n: int) -> bytes:
    # libp2p.io.utils.read_exactly gives up after 100 partial reads (notes/libp2p.md, bug 4).
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception as exc:  # StreamEOF / StreamReset from libp2p
            if not buf and n == HEADER_BYTES:
                raise EOFError("stream closed") from None
            raise FrameError(f"stream ended inside a frame ({len(buf)}/{n} bytes): {type(exc).__name__}") from None
        if not chunk:
            if not buf and n == HEADER_BYTES:
                raise EOFError("stream closed")
            raise FrameError(f"stream ended inside a frame ({len(buf)}/{n} bytes)")
        buf += chunk
    return bytes(buf)


async def read_message(
    stream: Stream, *, max_frame: int = DEFAULT_MAX_FRAME, timeout: float = DEFAULT_READ_TIMEOUT
) -> Message:
    """Read one message. Raises EOFError on a clean end of stream between frames."""
    with trio.fail_after(timeout):
        length = decode_length(await _read_exact(stream, HEADER_BYTES), max_frame)
        return decode_payload(await _read_exact(stream, length))


async def write_message(stream: Stream, message: Message, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
    await stream.write(encode_frame(message, max_frame))


async def request(
    stream: Stream, message: Message, *, max_frame: int = DEFAULT_MAX_FRAME, timeout: float = DEFAULT_READ_TIMEOUT, peer: str = ""
) -> Message:
    """Send one request and return its reply, raising :class:`RemoteError` for error replies."""
    await write_message(stream, message, max_frame=max_frame)
    try:
        reply = await read_message(stream, max_frame=max_frame, timeout=timeout)
    except EOFError:
        raise FrameError(f"{peer or 'peer'} closed the stream without replying") from None
    return raise_if_error(reply, peer)


Handler = Callable[[Message], Awaitable[Message]]


async def serve_stream(
    stream: Stream,
    handle: Handler,
    *,
    protocol: str,
    remote: str = "",
    max_frame: int = DEFAULT_MAX_FRAME,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> None:
    """Answer requests on one stream until it ends, never letting an error escape.

    An uncaught exception in a libp2p stream handler kills the whole host (notes/libp2p.md,
    bug 3), so this is the only place handlers run: protocol errors become error replies,
    framing errors end the stream, and anything unexpected is logged and answered.
    """
    plog = log.bind(protocol=protocol, remote=remote)
    remote_peer.set(remote)  # each stream is served in its own task, so this is per stream
    try:
        while True:
            try:
                message = await read_message(stream, max_frame=max_frame, timeout=timeout)
            except EOFError:
                return
            except P2PInferError as exc:  # malformed, truncated or oversized: the stream is unusable
                plog.warning("bad frame", code=exc.code, reason=exc.message)
                await _try_reply(stream, error_message(exc), max_frame)
                return
            except trio.TooSlowError:
                plog.info("read timeout, closing stream")
                return
            try:
                reply = await handle(message)
            except P2PInferError as exc:
                plog.info("request refused", type=message.get("type"), code=exc.code, reason=exc.message)
                reply = error_message(exc)
            except Exception as exc:
                plog.exception("handler failed", type=message.get("type"))
                reply = {"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            if not await _try_reply(stream, reply, max_frame):
                return
    except Exception:  # includes cancellation-free failures of the stream itself
        plog.exception("stream handler crashed")
    finally:
        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(2):
                    await stream.close()
            except Exception:
                pass


async def _try_reply(stream: Stream, reply: Message, max_frame: int) -> bool:
    try:
        await write_message(stream, reply, max_frame=max_frame)
    except FrameTooLarge as exc:
        return await _try_reply(stream, error_message(exc), max_frame)
    except Exception as exc:
        log.info("could not reply, peer gone", error=f"{type(exc).__name__}: {exc}")
        return False
    return True
