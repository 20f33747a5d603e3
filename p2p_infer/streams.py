"""Reusable request/reply streams to other peers, one per (peer, protocol).

Opening a libp2p stream costs a multistream-select negotiation (several ms in
py-libp2p); a query sends one request per hop, so both the client and forwarding peers
keep a stream open per neighbour and reuse it. A stream that fails is dropped and the
next request opens a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from .errors import P2PInferError, PeerUnreachable, RemoteError
from .framing import Message, request
from .host import dial, open_stream, peer_info

AddrLookup = Callable[[str], Sequence[str]]


class _Slot:
    def __init__(self) -> None:
        self.stream: INetStream | None = None
        self.lock = trio.Lock()


class StreamPool:
    def __init__(self, host: IHost, addrs_of: AddrLookup = lambda _peer: ()) -> None:
        self.host = host
        self.addrs_of = addrs_of
        self._slots: dict[tuple[str, str], _Slot] = {}

    async def request(
        self, peer_id: str, protocol: str, message: Message, *, timeout: float, addrs: Sequence[str] = ()
    ) -> Message:
        """One request/reply on the pooled stream; :class:`RemoteError` for error replies,
        :class:`PeerUnreachable` or :class:`FrameError` when the peer or stream fails."""
        slot = self._slots.setdefault((peer_id, protocol), _Slot())
        async with slot.lock:
            if slot.stream is None:
                slot.stream = await self._open(peer_id, protocol, addrs)
            try:
                return await request(slot.stream, message, timeout=timeout, peer=peer_id)
            except RemoteError:
                raise  # the stream is fine; the request was refused
            except (P2PInferError, trio.TooSlowError):
                slot.stream = None
                raise
            except Exception as exc:  # StreamReset, StreamEOF, ... from libp2p
                slot.stream = None
                raise PeerUnreachable(f"{peer_id}: {type(exc).__name__}: {exc}") from None

    async def _open(self, peer_id: str, protocol: str, addrs: Sequence[str]) -> INetStream:
        pid = ID.from_base58(peer_id)
        if pid not in self.host.get_connected_peers():
            known = list(addrs) or list(self.addrs_of(peer_id))
            await dial(self.host, peer_info(peer_id, [a.split("/p2p/")[0] for a in known]))
        return await open_stream(self.host, pid, protocol)

    def forget(self, peer_id: str) -> None:
        for key in [k for k in self._slots if k[0] == peer_id]:
            del self._slots[key]


