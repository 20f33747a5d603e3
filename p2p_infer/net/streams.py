"""Reusable request/reply streams to other peers, one per (peer, protocol).

Opening a libp2p stream costs a multistream-select negotiation (several ms in
py-libp2p); a query sends one request per hop, so both the client and forwarding peers
keep a stream open per neighbour and reuse it. A stream that fails is dropped and the
next request opens a fresh one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from ..errors import P2PInferError, PeerTimedOut, PeerUnreachable, RemoteError
from .framing import Message, request
from .host import dial, open_stream, peer_info

AddrLookup = Callable[[str], Awaitable[Sequence[str]]]


async def _no_addrs(_peer: str) -> Sequence[str]:
    return ()


def sync_lookup(fn: Callable[[str], Sequence[str]]) -> AddrLookup:
    """An address lookup that needs no I/O (a client's refreshed directory), as the pool takes it."""

    async def lookup(peer_id: str) -> Sequence[str]:
        return fn(peer_id)

    return lookup


class _Slot:
    def __init__(self) -> None:
        self.stream: INetStream | None = None
        self.lock = trio.Lock()


class StreamPool:
    def __init__(self, host: IHost, addrs_of: AddrLookup = _no_addrs) -> None:
        """``addrs_of`` says where a peer not yet connected may be dialled (its verified
        record's addresses); requests never bring their own."""
        self.host = host
        self.addrs_of = addrs_of
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._dialled: dict[str, list[str]] = {}  # the addresses each peer was last dialled at

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
        try:
            with trio.fail_after(timeout):
                return await self._request(peer_id, protocol, message, timeout)
        except trio.TooSlowError:
            self.forget(peer_id)
            raise PeerTimedOut(f"{peer_id} did not answer within {timeout} s (connecting or waiting for the stream)") from None

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
            raise AssertionError("unreachable")

    async def _open(self, peer_id: str, protocol: str) -> INetStream:
        pid = ID.from_base58(peer_id)
        if pid not in self.host.get_connected_peers():
            known = list(await self.addrs_of(peer_id))
            if not known:
                raise PeerUnreachable(f"{peer_id}: not connected, and no verified address to dial")
            addrs = [a.split("/p2p/")[0] for a in known]
            if self._dialled.get(peer_id) != addrs:  # new addresses (a peer restarted on another port): py-libp2p's
                self._dialled[peer_id] = addrs  # 60 s negative dial cache of the old ones would refuse it (issue 13's churn)
                unblock = getattr(self.host.get_network(), "unblock_peer", None)
                if unblock is not None:
                    unblock(pid)
                while len(self._dialled) > 4096:
                    self._dialled.pop(next(iter(self._dialled)))
            await dial(self.host, peer_info(peer_id, addrs))
        return await open_stream(self.host, pid, protocol)

    def forget(self, peer_id: str) -> None:
        for key in [k for k in self._slots if k[0] == peer_id]:
            del self._slots[key]


