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
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import msgpack
import structlog
import trio

from ..errors import FrameError, FrameTooLarge, P2PInferError, ProtocolViolation, RemoteError, StreamUnusable
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


def decode_payload(payload: bytes | bytearray) -> Message:
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


async def _no_pace(nbytes: int) -> None:
    return None


async def _read_exact(stream: Stream, n: int, pace: Callable[[int], Awaitable[None]] = _no_pace) -> bytearray:
    # libp2p.io.utils.read_exactly gives up after 100 partial reads (notes/libp2p.md, bug 4).
    # The buffer grows as bytes arrive, so an announced but unsent frame costs nothing yet.
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
        await pace(len(chunk))  # a sender over its byte rate waits here: yamux then stops its window
    return buf


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


class Held(Protocol):
    """Bytes reserved for one frame (``net/limits.Reservation``)."""

    def keep(self) -> Held: ...
    def release(self) -> None: ...
    def release_unless_kept(self) -> None: ...


class Guard(Protocol):
    """Per-remote-peer admission (``net/limits.py``); every method raises Overloaded to refuse."""

    def open_stream(self, peer: str) -> None: ...
    def close_stream(self, peer: str) -> None: ...
    def admit_request(self, peer: str) -> None: ...
    def reserve(self, peer: str, size: int) -> Held: ...
    async def pace(self, peer: str, nbytes: int) -> None: ...


class _NoLimits:
    def open_stream(self, peer: str) -> None: ...
    def close_stream(self, peer: str) -> None: ...
    def admit_request(self, peer: str) -> None: ...

    def reserve(self, peer: str, size: int) -> Held:
        return self

    async def pace(self, peer: str, nbytes: int) -> None:
        return None

    def keep(self) -> Held:
        return self

    def release(self) -> None: ...
    def release_unless_kept(self) -> None: ...


NO_LIMITS = _NoLimits()
# the reservation of the request being handled: forwarding keeps it for its background work
current_reservation: ContextVar[Held | None] = ContextVar("current_reservation", default=None)


@dataclass(frozen=True)
class Timeouts:
    idle: float = DEFAULT_READ_TIMEOUT  # waiting for the next request on a stream
    frame: float = DEFAULT_READ_TIMEOUT  # reading one frame's payload once its length arrived


async def _next_request(stream: Stream, guard: Guard, remote: str, max_frame: int, timeouts: Timeouts) -> tuple[Message, Held]:
    """Wait for a frame header, admit and reserve the frame, then read and decode it.
    EOFError: clean end between frames; trio.TooSlowError: idle; StreamUnusable: refused."""
    try:
        with trio.fail_after(timeouts.idle):
            header = await _read_exact(stream, HEADER_BYTES)
        length = decode_length(header, max_frame)
        guard.admit_request(remote)
        held = guard.reserve(remote, length)
    except P2PInferError as exc:  # the payload that follows is never read: the stream cannot resync
        raise StreamUnusable(exc) from None
    try:
        with trio.fail_after(timeouts.frame):
            payload = await _read_exact(stream, length, partial(guard.pace, remote))
        return decode_payload(payload), held
    except trio.TooSlowError:
        held.release_unless_kept()
        raise StreamUnusable(FrameError(f"frame of {length} bytes not received within {timeouts.frame} s")) from None
    except P2PInferError as exc:
        held.release_unless_kept()
        raise StreamUnusable(exc) from None
    except BaseException:
        held.release_unless_kept()
        raise


async def _answer(handle: Handler, message: Message, plog: Any) -> Message:
    try:
        return await handle(message)
    except P2PInferError as exc:
        plog.info("request refused", type=message.get("type"), code=exc.code, reason=exc.message)
        return error_message(exc)
    except Exception as exc:
        plog.exception("handler failed", type=message.get("type"))
        return {"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"}


async def serve_stream(
    stream: Stream,
    handle: Handler,
    *,
    protocol: str,
    remote: str = "",
    max_frame: int = DEFAULT_MAX_FRAME,
    timeouts: Timeouts = Timeouts(),
    guard: Guard = NO_LIMITS,
) -> None:
    """Answer requests on one stream until it ends, never letting an error escape.

    An uncaught exception in a libp2p stream handler kills the whole host (notes/libp2p.md,
    bug 3), so this is the only place handlers run: protocol errors become error replies,
    framing errors and refusals (``overloaded``: over a per-peer or global limit) end the
    stream after their reply, and anything unexpected is logged and answered.
    """
    plog = log.bind(protocol=protocol, remote=remote)
    remote_peer.set(remote)  # each stream is served in its own task, so this is per stream
    try:
        guard.open_stream(remote)
    except P2PInferError as exc:
        plog.info("stream refused", code=exc.code, reason=exc.message)
        await _try_reply(stream, error_message(exc), max_frame)
        await _end(stream, reset=True)
        return
    reset = False
    try:
        reset = await _serve_requests(stream, handle, guard, remote, max_frame, timeouts, plog)
    except Exception:  # includes cancellation-free failures of the stream itself
        plog.exception("stream handler crashed")
    finally:
        guard.close_stream(remote)
        await _end(stream, reset=reset)


async def _serve_requests(stream: Stream, handle: Handler, guard: Guard, remote: str, max_frame: int,
                          timeouts: Timeouts, plog: Any) -> bool:
    """The request loop of :func:`serve_stream`; True when the stream must be reset."""
    while True:
        try:
            message, held = await _next_request(stream, guard, remote, max_frame, timeouts)
        except EOFError:
            return False
        except trio.TooSlowError:
            plog.debug("stream idle, closing")
            return False
        except StreamUnusable as refused:  # malformed, truncated, oversized or over a limit
            level = plog.info if refused.error.code == "overloaded" else plog.warning
            level("frame refused", code=refused.error.code, reason=refused.error.message)
            await _try_reply(stream, error_message(refused.error), max_frame)
            return True  # drop what the sender still pushes (a reset frees yamux's buffer)
        token = current_reservation.set(held)
        try:
            reply = await _answer(handle, message, plog)
        finally:
            current_reservation.reset(token)
            del message  # the request's memory goes back before the reservation does
            held.release_unless_kept()
        if not await _try_reply(stream, reply, max_frame):
            return False


REFUSAL_GRACE = 2.0  # seconds a refused stream stays half-closed so its error reply is read


async def _end(stream: Stream, *, reset: bool) -> None:
    """Close the stream; a refused one (payload still coming) is reset after a short grace:
    a yamux reset discards data not yet read at the other end, our error reply included,
    while a plain close would leave the sender's unread payload buffered here."""
    with trio.CancelScope(shield=True):
        try:
            with trio.move_on_after(2 + REFUSAL_GRACE):
                await stream.close()
                if reset and hasattr(stream, "reset"):
                    await trio.sleep(REFUSAL_GRACE)
                    await stream.reset()
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
