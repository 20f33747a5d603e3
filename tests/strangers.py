"""Helpers for tests that abuse real peer processes: bare libp2p connections under fresh
identities (Noise and Yamux, no host, no protocols), and a process's resident memory."""

from __future__ import annotations

from pathlib import Path

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader


async def bare_connection(nursery: trio.Nursery, addr: str) -> Yamux:
    """A new identity completes Noise and Yamux with the peer at ``addr`` and opens nothing
    (it answers no protocol either); the connection runs in ``nursery``."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    kp = create_new_key_pair()
    upgrader = TransportUpgrader({NOISE_ID: Noise(kp, noise_privkey=new_x25519().private_key)}, {YAMUX_ID: Yamux})
    raw = await TCP().dial(info.addrs[0])
    secured = await upgrader.upgrade_security(raw, True, info.peer_id)
    muxed = await upgrader.upgrade_connection(secured, info.peer_id)
    nursery.start_soon(muxed.start)
    return muxed  # type: ignore[return-value]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")
