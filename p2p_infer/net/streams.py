"""Reusable request/reply streams to other peers, one per (peer, protocol).

Opening a libp2p stream costs a multistream-select negotiation (several ms in
py-libp2p); a query sends one request per hop, so both the client and forwarding peers
keep a stream open per neighbour and reuse it. A stream that fails is dropped and the
next request opens a fresh one.

A request that times out without the peer having answered *anything* since it was sent,
while the kernel retransmits into silence on the connection (``host.tcp_stalled``), means the
connection is stalled or dead, not that the peer is slow: it is closed (in the background,
bounded), so the next request dials afresh. Kept, a TCP connection that
carried data through a partition sits in the kernel's retransmission backoff (200 ms doubled
per unanswered try: 0.2 ... 12.8 s, 25.4 s in all) and stalls every request on it until its
next retry, up to as long again after the heal (issue 13's ~25 s waits after a heal).
``on_unreachable`` is told of every peer that could not be reached or stalled that way (the
client then drops the peer's held committee ticket: it must answer a ticket request before
it is drawn again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import structlog
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from ..bounded import trim_oldest
from ..errors import P2PInferError, PeerTimedOut, PeerUnreachable, RemoteError
from .framing import Message, request
from .host import dial, open_stream, peer_info, tcp_stalled

AddrLookup = Callable[[str], Awaitable[Sequence[str]]]
CLOSE_BOUND_S = 2.0  # closing a stalled connection writes a GO_AWAY that may never leave
log = structlog.get_logger("p2p_infer.streams")


async def _no_addrs(_peer: str) -> Sequence[str]:
    return ()


def sync_lookup(fn: Callable[[str], Sequence[str]]) -> AddrLookup:
    """An address lookup that needs no I/O (a client's refreshed directory), as the pool takes it."""

    async def lookup(peer_id: str) -> Sequence[str]:
        return fn(peer_id)

    return lookup


def abandon(stream: INetStream | None) -> None:
    """Reset a stream left mid-request, in the background (the caller is being cancelled)."""
    if stream is None:
        return

    async def reset() -> None:
        with trio.move_on_after(CLOSE_BOUND_S):
            try:
                await stream.reset()
            except Exception:  # already closed or reset: gone either way
                pass

    trio.lowlevel.spawn_system_task(reset)


class _Slot:
    def __init__(self) -> None:
        self.stream: INetStream | None = None
        self.lock = trio.Lock()


class StreamPool:
    def __init__(self, host: IHost, addrs_of: AddrLookup = _no_addrs, on_unreachable: Callable[[str], None] | None = None) -> None:
        """``addrs_of`` says where a peer not yet connected may be dialled (its verified
        record's addresses); requests never bring their own."""
        self.host = host
        self.addrs_of = addrs_of
        self.on_unreachable = on_unreachable
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._heard: dict[str, float] = {}  # peer -> trio time of its last reply (any request, any protocol)

    async def request(
        self, peer_id: str, protocol: str, message: Message, *, timeout: float
    ) -> Message:
        """One request/reply on the pooled stream; :class:`RemoteError` for error replies,
        :class:`PeerUnreachable` or :class:`FrameError` when the peer or stream fails.

        A pooled stream may have been closed by the other side while idle (framing's read
        timeout): if a *reused* stream fails before any reply, the request is retried once on
        a fresh stream. Timeouts and malformed peer ids or addresses become PeerUnreachable,
        so callers only ever see P2PInferError subclasses."""
        # The deadline covers the wait for the slot, the dial and the stream negotiation too: a
        # connection that went dead (a partition, a killed peer, a starved box) makes
        # open_stream hang for py-libp2p's 10-30 s negotiation timeouts, and every request to
        # that peer queued behind it on the lock, outside any timeout (a 3 s ticket took 27 s).
        sent = trio.current_time()
        try:
            with trio.fail_after(timeout):
                reply = await self._request(peer_id, protocol, message, timeout)
        except trio.TooSlowError:
            self._timed_out(peer_id, sent)
            raise PeerTimedOut(f"{peer_id} did not answer within {timeout} s (connecting or waiting for the stream)") from None
        except PeerTimedOut:
            self._timed_out(peer_id, sent)
            raise
        except RemoteError:
            self._heard[peer_id] = trio.current_time()  # it answered, with a refusal
            raise
        except PeerUnreachable:
            self._unreachable(peer_id)
            raise
        self._heard[peer_id] = trio.current_time()
        trim_oldest(self._heard, 4096)  # the peers first heard from go first
        return reply

    def _timed_out(self, peer_id: str, sent: float) -> None:
        """Forget the peer's streams; if it answered nothing since ``sent`` and the connection is
        stalled (or none can be checked), close the connection too."""
        self.forget(peer_id)
        if self._heard.get(peer_id, float("-inf")) >= sent:
            return  # it answered something meanwhile: alive, slow
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            return
        if not self._connected(pid):
            self._unreachable(peer_id)  # the dial itself did not finish
        elif tcp_stalled(self.host, pid) is not False:
            self._close_connection(pid)
            self._unreachable(peer_id)

    def _unreachable(self, peer_id: str) -> None:
        if self.on_unreachable is not None:
            self.on_unreachable(peer_id)

    def _close_connection(self, pid: ID) -> None:
        peer_id = str(pid)

        async def close() -> None:
            with trio.move_on_after(CLOSE_BOUND_S):
                try:
                    await self.host.get_network().close_peer(pid)
                except Exception as exc:  # a dead connection may fail to close cleanly: it is gone either way
                    log.info("closing a stalled connection failed", peer=peer_id, error=f"{type(exc).__name__}: {exc}")
            log.info("stalled connection closed", peer=peer_id)

        trio.lowlevel.spawn_system_task(close)

    async def _request(self, peer_id: str, protocol: str, message: Message, timeout: float) -> Message:
        slot = self._slots.setdefault((peer_id, protocol), _Slot())
        async with slot.lock:
            for attempt in (0, 1):
                reused = slot.stream is not None
                try:
                    if slot.stream is None:
                        slot.stream = await self._open(peer_id, protocol)
                    return await request(slot.stream, message, timeout=timeout, peer=peer_id)
                except RemoteError:
                    raise  # the stream is fine; the request was refused
                except trio.TooSlowError:
                    slot.stream = None
                    raise PeerTimedOut(f"{peer_id} did not answer within {timeout} s") from None
                except P2PInferError:
                    slot.stream = None
                    if reused and attempt == 0:
                        continue
                    raise
                except Exception as exc:  # StreamReset, StreamEOF, bad peer id or address, ...
                    slot.stream = None
                    if reused and attempt == 0:
                        continue
                    raise PeerUnreachable(f"{peer_id}: {type(exc).__name__}: {exc}") from None
                except BaseException:  # cancelled (the caller's deadline) with the reply still on its way:
                    abandon(slot.stream)  # that reply must not be read as the next request's (it was, under churn)
                    slot.stream = None
                    raise
            raise AssertionError("unreachable")

    async def _open(self, peer_id: str, protocol: str) -> INetStream:
        pid = ID.from_base58(peer_id)
        if not self._connected(pid):
            known = list(await self.addrs_of(peer_id))
            if not known:
                raise PeerUnreachable(f"{peer_id}: not connected, and no verified address to dial")
            addrs = [a.split("/p2p/")[0] for a in known]
            # py-libp2p refuses for 60 s to dial a peer whose every address failed once: a peer
            # restarted on another port (issue 13's churn), or one behind a partition that has
            # healed, would be refused from that cache. The pool dials only with a request in
            # hand, bounded by its deadline, so it always asks the network itself.
            unblock = getattr(self.host.get_network(), "unblock_peer", None)
            if unblock is not None:
                unblock(pid)
            await dial(self.host, peer_info(peer_id, addrs))
        return await open_stream(self.host, pid, protocol)

    def _connected(self, pid: ID) -> bool:
        """Whether a usable connection to ``pid`` is open. py-libp2p can keep a closed one listed
        (a close cut short): it then answers every new stream with "No valid connections" and
        never dials again, so such entries are dropped here and the caller dials."""
        network = self.host.get_network()
        listed = network.get_connections(pid)
        if listed and all(getattr(c, "is_closed", False) for c in listed):
            table = getattr(network, "connections", None)
            if isinstance(table, dict):
                table.pop(pid, None)
            return False
        return bool(listed)

    def forget(self, peer_id: str) -> None:
        for key in [k for k in self._slots if k[0] == peer_id]:
            del self._slots[key]


