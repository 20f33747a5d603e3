"""Where a peer may dial another peer: only at the addresses of that peer's verified record.

A forward request names its next hops, and used to carry their addresses too; a peer that
dialled those would connect wherever any client pointed it (issue 10). The address book
looks the record up through the DHT (:class:`~p2p_infer.net.dht.Discovery`, which checks
the signature, the key binding and the expiry), keeps the addresses briefly, and is the
only source of addresses a peer dials when forwarding.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import structlog
import trio

from ..bounded import trim_oldest
from .dht import Discovery

log = structlog.get_logger("p2p_infer.addressbook")
CACHE_SECONDS = 30.0  # a record lives 120 s by default; peers that moved are found again soon
MAX_ENTRIES = 1024


class AddressBook:
    def __init__(self, discovery: Discovery, ttl: float = CACHE_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        self.discovery = discovery
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self._lookups: dict[str, trio.Event] = {}  # one DHT lookup per peer at a time

    async def addrs(self, peer_id: str) -> list[str]:
        """The addresses in ``peer_id``'s verified record, or [] when it has none."""
        cached = self._cache.get(peer_id)
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        if peer_id in self._lookups:
            await self._lookups[peer_id].wait()
            return self._cache.get(peer_id, (0.0, []))[1]
        done = self._lookups[peer_id] = trio.Event()
        try:
            record = await self.discovery.get_record(peer_id)
            found = [a for a in record.addrs if a.endswith(f"/p2p/{peer_id}") or "/p2p/" not in a] if record else []
            self._cache[peer_id] = (time.monotonic(), found)
            self._cache.move_to_end(peer_id)
            trim_oldest(self._cache, self.max_entries)
            if not found:
                log.info("no verified record to dial", subject=peer_id)
            return found
        finally:
            del self._lookups[peer_id]
            done.set()
