"""py-libp2p's ``INotifee`` with every callback a no-op, so a notifee overrides only the
events it cares about (the interface declares all six abstract)."""

from __future__ import annotations

from typing import Any

from libp2p.abc import INetConn, INetStream, INetwork, INotifee


class Notifee(INotifee):
    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        pass
