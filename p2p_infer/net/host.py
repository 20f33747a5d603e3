"""The libp2p host: TCP + Noise + Yamux only, no dial delay, guarded stream handlers.

Settings here follow the measured pitfalls in ``notes/libp2p.md``: the default host also
offers plaintext (so security options are pinned to Noise), every dial waits 250 ms
unless ``max_connections_per_peer=1``, a raising handler kills the host (so handlers go
through :func:`framing.serve_stream`), and leaving ``host.run()`` without ``close()``
leaves zombie connections at the other end.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from weakref import WeakKeyDictionary

import multiaddr
import structlog
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp import tcp as libp2p_tcp

from ..config import Limits
from ..errors import ListenError, P2PInferError, PeerUnreachable, first_leaf
from ..identity import Identity
from .framing import DEFAULT_MAX_FRAME, Handler, Timeouts, serve_stream
from .idle import IdleReaper
from .limits import Guard, resource_manager

# py-libp2p's yamux sends a WINDOW_UPDATE frame after every read by default (its
# PY_YAMUX_RELEASE_ON_READ=1): one more encrypted frame and send() per message read, a third
# of a committee client's frames. 0 keeps go-yamux's rule (an update once half the window
# is consumed), which the yamux spec leaves to the receiver; measured in bench/RESULTS.md.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
DIAL_TIMEOUT = 10.0
log = structlog.get_logger("p2p_infer.host")


def quiet_libp2p_logging() -> None:
    """py-libp2p logs routine events (a departed peer's address refusing a dial, a DHT
    stream ending) at WARNING and ERROR straight to stderr (notes, bug 17). Keep them out
    of our structured logs unless ``P2P_INFER_LIBP2P_LOG=warning`` (or debug, ...) asks."""
    level = os.environ.get("P2P_INFER_LIBP2P_LOG", "critical").upper()
    logging.getLogger("libp2p").setLevel(logging.getLevelNamesMapping().get(level, logging.CRITICAL))


def key_pair(identity: Identity) -> KeyPair:
    private = Ed25519PrivateKey.from_bytes(identity.seed)
    return KeyPair(private, private.get_public_key())


_GUARDS: WeakKeyDictionary[IHost, Guard] = WeakKeyDictionary()  # per host: what it grants remote peers


def connection_config(limits: Limits) -> ConnectionConfig:
    """py-libp2p's connection manager: ``max_connections`` is the hard cap its swarm enforces
    at accept and at registration; past the high watermark its pruner closes connections
    without streams (oldest first, after the grace period) down to the low watermark."""
    high = min(limits.max_connections, max(8, limits.max_connections * 3 // 4))
    return ConnectionConfig(
        max_connections=limits.max_connections,
        max_connections_per_peer=1,  # removes the 250 ms happy-eyeballs wait on every dial
        min_connections=min(4, high),
        low_watermark=min(8, high),
        high_watermark=high,
        grace_period=min(20.0, limits.conn_idle_timeout / 2),
        inbound_upgrade_timeout=10.0,  # a Noise handshake that stalls gives its slot back
    )


def make_host(identity: Identity, listen: str = DEFAULT_LISTEN, limits: Limits | None = None) -> IHost:
    limits = limits or Limits()
    kp = key_pair(identity)
    rcmgr = resource_manager(limits)
    host = new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=new_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_ID: Yamux},
        listen_addrs=[multiaddr.Multiaddr(listen)],
        connection_config=connection_config(limits),
        resource_manager=rcmgr,
    )
    _GUARDS[host] = Guard(limits, rcmgr)
    _lift_inbound_slot_leak(host)
    _bound_yamux_reset()
    return host


RESET_BOUND_S = 2.0


def _bound_yamux_reset() -> None:
    """py-libp2p 0.8.1's ``new_stream`` resets a stream it failed to open inside a *shielded*
    scope, and the reset waits for the connection's write lock; when that lock is held by a
    write stalled on a dead or starved connection, the wait never ends and nothing can cancel
    the caller (issue 13: light clients' queries stuck for up to 5 minutes past their own
    deadline, in a directory refresh, on a loaded box; loadgen's watchdog recorded the stack:
    basic_host.new_stream -> net_stream.reset -> yamux _write_frame -> _write_lock). A reset
    that cannot be sent within RESET_BOUND_S is given up: the stream is marked closed (the
    original's ``finally``) and its backlog slot released, as a sent reset would."""
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    original = YamuxStream.reset
    if getattr(original, "_p2p_infer_bounded", False):
        return

    async def reset(self: YamuxStream) -> None:
        with trio.move_on_after(RESET_BOUND_S) as scope:  # honoured inside the caller's shield
            await original(self)
        if scope.cancelled_caught:
            log.info("yamux reset not sent in time: stream closed locally", stream=self.stream_id, bound_s=RESET_BOUND_S)
            with trio.move_on_after(RESET_BOUND_S):
                await self.conn._finalize_stream(self, fully_closed=True)

    reset._p2p_infer_bounded = True  # type: ignore[attr-defined]
    YamuxStream.reset = reset  # type: ignore[method-assign]


def _lift_inbound_slot_leak(host: IHost) -> None:
    """The py-libp2p 0.8.1 build we pin caps inbound connections with a CapacityLimiter of
    ``max_connections - min_connections`` slots, but its inbound handler keeps its slot until
    the swarm stops (it awaits ``manager.wait_finished()`` after the upgrade), so after that
    many inbound connections *ever*, every new one is refused (found by
    tests/test_limits.py; upstream's current swarm has no such limiter). Connections are
    bounded instead by ``max_connections``, which the swarm checks at accept and at
    registration, and by rcmgr's limits."""
    swarm = host.get_network()
    if hasattr(swarm, "_inbound_limiter"):
        swarm._inbound_limiter = trio.CapacityLimiter(math.inf)  # type: ignore[attr-defined]


def guard_of(host: IHost) -> Guard:
    """The per-peer limits of a host made here (a default Guard for any other host)."""
    return _GUARDS.setdefault(host, Guard())


def _reuse_addr_only(sock: trio.socket.SocketType) -> None:
    """py-libp2p 0.8.1 sets SO_REUSEPORT on listen sockets (for TCP hole punching, which we
    do not use), so a second peer on a busy port "succeeds" and the kernel splits dials
    between two peer ids. SO_REUSEADDR alone still allows a quick restart on the same port."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


libp2p_tcp._set_reuse_flags = _reuse_addr_only


@asynccontextmanager
async def running_host(identity: Identity, listen: str = DEFAULT_LISTEN, limits: Limits | None = None) -> AsyncIterator[IHost]:
    """Run a host (closing idle connections) and always close it, so peers see us leave at once."""
    limits = limits or Limits()
    host = make_host(identity, listen, limits)
    try:
        async with host.run(listen_addrs=[multiaddr.Multiaddr(listen)]), trio.open_nursery() as nursery:
            try:
                if not host.get_addrs():  # py-libp2p logs a failed listen and carries on without one
                    raise ListenError(f"cannot listen on {listen}: {_why_not_listening(listen)}")
                nursery.start_soon(IdleReaper(host, limits.conn_idle_timeout).run)
                yield host
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(5):
                        await host.close()
    except BaseExceptionGroup as group:  # host.run's nursery wraps it; callers get the one error
        matched, rest = group.split(ListenError)
        if matched is None or rest is not None:
            raise
        raise first_leaf(matched) from None


def _why_not_listening(listen: str) -> str:
    """The operating system's reason, found by binding the address the way the host did."""
    try:
        ma = multiaddr.Multiaddr(listen)
        ip = ma.value_for_protocol("ip4")
        port = int(ma.value_for_protocol("tcp"))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            _reuse_addr_only(probe)  # type: ignore[arg-type]
            probe.bind((ip, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    except Exception as exc:  # not an /ip4/.../tcp/N address
        return f"unsupported address ({exc})"
    return "the transport refused it"


def parse_peer_addr(addr: str) -> PeerInfo:
    """``/ip4/.../tcp/N/p2p/<peer id>`` to a PeerInfo, with a clear error otherwise."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:
        raise P2PInferError(f"not a full peer multiaddr (need /p2p/<peer id>): {addr!r}: {exc}") from None


def peer_info(peer_id: str, addrs: Sequence[str]) -> PeerInfo:
    return PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in addrs])


def full_addrs(host: IHost) -> list[str]:
    """Listen addresses including ``/p2p/<id>``, as other peers dial them."""
    return [str(a) for a in host.get_addrs()]


async def dial(host: IHost, info: PeerInfo, timeout: float = DIAL_TIMEOUT) -> None:
    try:
        with trio.fail_after(timeout):
            await host.connect(info)
    except trio.TooSlowError:
        raise PeerUnreachable(f"dial to {info.peer_id} timed out after {timeout} s") from None
    except Exception as exc:
        raise PeerUnreachable(f"cannot dial {info.peer_id}: {type(exc).__name__}: {exc}") from None


async def open_stream(host: IHost, peer: ID, protocol: str, timeout: float = DIAL_TIMEOUT) -> INetStream:
    """Open a stream with a deadline: ``new_stream`` can block forever (notes, bug 6)."""
    try:
        with trio.fail_after(timeout):
            return await host.new_stream(peer, [TProtocol(protocol)])
    except trio.TooSlowError:
        raise PeerUnreachable(f"opening {protocol} to {peer} timed out after {timeout} s") from None
    except Exception as exc:
        raise PeerUnreachable(f"cannot open {protocol} to {peer}: {type(exc).__name__}: {exc}") from None


def add_handler(host: IHost, protocol: str, handle: Handler, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
    """Serve ``protocol`` with request/reply ``handle`` behind the guarded framing loop, under
    the host's per-peer limits and stream timeouts."""
    guard = guard_of(host)
    timeouts = Timeouts(idle=guard.limits.stream_idle_timeout, frame=guard.limits.frame_timeout)

    async def on_stream(stream: INetStream) -> None:
        try:
            remote = str(stream.muxed_conn.peer_id)
        except Exception:
            remote = "?"
        await serve_stream(stream, handle, protocol=protocol, remote=remote, max_frame=max_frame, timeouts=timeouts, guard=guard)

    host.set_stream_handler(TProtocol(protocol), on_stream)


STALLED_RETRANSMITS = 2  # unanswered retransmission timeouts in a row: >= 0.6 s with data out and no ACK
_LINK_ATTRS = ("muxed_conn", "secured_conn", "conn", "read_writer", "read_write_closer", "stream")


def tcp_stalled(host: IHost, peer: ID) -> bool | None:
    """Whether the kernel is retransmitting into silence on our TCP connection(s) to ``peer``
    (``tcpi_retransmits``: retransmission timeouts since the last ACK), None where no TCP
    socket can be found under py-libp2p's connection layers. A slow peer ACKs what it was
    sent, and a peer computing a long answer has ACKed the request: neither stalls."""
    found = False
    for conn in host.get_network().get_connections(peer):
        sock = _socket_under(conn)
        if sock is None:
            continue
        found = True
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except OSError:
            continue
        if info[2] >= STALLED_RETRANSMITS:  # struct tcp_info: state, ca_state, retransmits, ...
            return True
    return False if found else None


def _socket_under(conn: object, depth: int = 0) -> socket.socket | None:
    """The trio socket under a py-libp2p connection (swarm conn -> yamux -> noise -> raw -> trio stream)."""
    if isinstance(conn, trio.SocketStream):
        return conn.socket  # type: ignore[return-value]
    if depth > 8:
        return None
    for name in _LINK_ATTRS:
        inner = getattr(conn, name, None)
        if inner is not None and inner is not conn:
            sock = _socket_under(inner, depth + 1)
            if sock is not None:
                return sock
    return None


__all__ = [
    "DEFAULT_LISTEN",
    "add_handler",
    "connection_config",
    "dial",
    "full_addrs",
    "guard_of",
    "make_host",
    "open_stream",
    "parse_peer_addr",
    "peer_info",
    "quiet_libp2p_logging",
    "running_host",
    "tcp_stalled",
]
