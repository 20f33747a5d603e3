"""Kademlia discovery: joining through bootstrap peers, storing records, finding providers.

A thin adapter over py-libp2p's ``KadDHT``. What it adds, from ``notes/libp2p.md``:
a record validator registered on every node (strict namespaces), tight timeouts on
every DHT call (a dead peer otherwise stalls a lookup for 10 s), paced provider
announcements (the receiver drops more than 10 per 10 s silently), de-duplicated
provider lists, and re-joining through the bootstrap list when all connections drop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from functools import partial
from typing import Any

import structlog
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.kad_dht import common as kad_common
from libp2p.kad_dht import kad_dht as kad_module
from libp2p.kad_dht import peer_routing as kad_peer_routing
from libp2p.kad_dht import provider_store as kad_provider_store
from libp2p.kad_dht import value_store as kad_value_store
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import NamespacedValidator, Validator

from ..clock import now_ms
from ..errors import InvalidDhtValue, PeerUnreachable, RecordError
from .host import dial
from ..proto.records import KEY_NAMESPACE, CapabilityRecord, newest, record_key, verify_record

DHT_CALL_TIMEOUT = 15.0
PER_PEER_QUERY_TIMEOUT = 3
FAST_FANOUT = 3  # closest known peers asked directly before an iterative lookup
STORE_FANOUT = 5  # closest known peers a record is stored at directly (as hivemind's num_replicas)
PROVIDE_SPACING = 1.1  # seconds between announcements: stays under 10 per 10 s
log = structlog.get_logger("p2p_infer.dht")


def tune_libp2p_kademlia() -> None:
    """Shorten py-libp2p's per-peer query timeout from 10 s: on loopback or LAN, a peer
    that has not answered in 3 s is gone, and waiting longer stalls every lookup."""
    for module in (kad_common, kad_module, kad_peer_routing, kad_provider_store, kad_value_store):
        if hasattr(module, "QUERY_TIMEOUT"):
            module.QUERY_TIMEOUT = PER_PEER_QUERY_TIMEOUT  # type: ignore[attr-defined]


class RecordValidator(Validator):
    """DHT-level check of ``/p2p-infer/peer/<id>`` values: signed by ``<id>``, unexpired."""

    def validate(self, key: str, value: bytes) -> None:
        parts = key.split("/")
        if len(parts) != 4 or parts[2] != "peer":
            raise InvalidDhtValue(f"unknown p2p-infer key {key!r}")
        try:
            verify_record(value, now=now_ms(), expected_peer_id=parts[3])
        except RecordError as exc:
            raise InvalidDhtValue(exc.message) from None

    def select(self, key: str, values: list[bytes]) -> int:
        return newest(values)


class _DropClients(INotifee):
    """py-libp2p puts every peer that opens a KAD stream in the routing table, light clients
    (``p2p-infer query``) too; once such a client disconnects, it is dropped again, so later
    clients neither list it nor wait on it in lookups (it never offered the KAD protocol)."""

    def __init__(self, kad: KadDHT) -> None:
        self.kad = kad

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        try:
            peer = conn.muxed_conn.peer_id
            protocols = network.peerstore.get_protocols(peer) if hasattr(network, "peerstore") else None
            if protocols and str(KAD_PROTOCOL) not in protocols:
                self.kad.routing_table.remove_peer(peer)
        except Exception:  # noqa: BLE001 - a notifee must never break the swarm
            pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        pass


class Discovery:
    """One host's view of the DHT: join, publish, look up."""

    def __init__(self, host: IHost, *, server: bool, bootstrap: Sequence[PeerInfo] = ()) -> None:
        tune_libp2p_kademlia()
        self.host = host
        self.bootstrap = [b for b in bootstrap if b.peer_id != host.get_id()]
        validator = NamespacedValidator({KEY_NAMESPACE: RecordValidator()}, strict_validation=True)
        self.kad = KadDHT(
            host,
            DHTMode.SERVER if server else DHTMode.CLIENT,
            validator=validator,
            validator_changed=True,
            strict_validation=True,
            max_peers_per_subnet=0,  # many peers share a /24 in data centres (notes, bug 20)
        )
        if server:
            host.get_network().register_notifee(_DropClients(self.kad))
        self.log = log.bind(peer=str(host.get_id()))

    async def join(self) -> int:
        """Dial the bootstrap peers, seed the routing table, refresh it; return peers joined."""
        joined = 0
        for info in self.bootstrap:
            try:
                await dial(self.host, info)
                await self.kad.add_peer(info.peer_id, skip_server_mode_check=True)
                joined += 1
            except PeerUnreachable as exc:
                self.log.warning("bootstrap peer unreachable", bootstrap=str(info.peer_id), reason=exc.message)
        if joined:
            await self.refresh()
        return joined

    async def refresh(self) -> None:
        with trio.move_on_after(DHT_CALL_TIMEOUT):
            await self.kad.refresh_routing_table()

    def connected_peers(self) -> list[ID]:
        return list(self.host.get_connected_peers())

    async def maintain(self, interval: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background loop: refresh the routing table; re-join when every connection is gone."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            if not self.connected_peers() and self.bootstrap:
                self.log.info("no connections left, re-joining through bootstrap list")
                await self.join()
            else:
                await self.refresh()

    async def put_record(self, peer_id: str, envelope: bytes, *, thorough: bool = True) -> int:
        """Store a record; return how many remote peers took it on the fast path.

        Fast path: the closest peers in our routing table, in parallel, one RPC each, so
        the record is readable (by :meth:`get_record`'s fast path) within one round trip.
        Then, if ``thorough``, py-libp2p's full ``put_value`` (an iterative lookup for the
        true closest peers) places it where a large network expects it.
        """
        key = record_key(peer_id)
        self.kad.validator.validate(key, envelope)  # never spread what we would refuse
        self.kad.value_store.put(key.encode(), envelope)
        stored = sum(await self._ask_closest(key, partial(self._store_at, envelope=envelope), fanout=STORE_FANOUT))
        if thorough:
            with trio.move_on_after(DHT_CALL_TIMEOUT) as scope:
                await self.kad.put_value(key, envelope)
            if scope.cancelled_caught:
                self.log.warning("record put timed out", key=key)
        return stored

    async def _store_at(self, peer: ID, key_bytes: bytes, *, envelope: bytes) -> list[bool]:
        return [bool(await self.kad.value_store._store_at_peer(peer, key_bytes, envelope))]

    async def provide(self, keys: Collection[str]) -> None:
        for i, key in enumerate(keys):
            if i:
                await trio.sleep(PROVIDE_SPACING)
            with trio.move_on_after(DHT_CALL_TIMEOUT):
                await self.kad.provide(key)

    async def find_providers(self, key: str, count: int = 100) -> list[PeerInfo]:
        """Providers of ``key``, one entry per peer (py-libp2p returns duplicates).

        Fast path first: ask the few peers closest to the key in our own routing table, in
        parallel, one RPC each. Only when they know no provider do we pay for py-libp2p's
        iterative lookup (about 10 RPCs at ~6 ms of CPU each, notes/libp2p.md section 3.2).
        """
        found = await self._ask_closest(key, self._providers_from)
        if not found:
            with trio.move_on_after(DHT_CALL_TIMEOUT) as scope:
                found = await self.kad.find_providers(key, count)
            if scope.cancelled_caught:
                self.log.warning("provider lookup timed out", key=key)
        unique: dict[ID, PeerInfo] = {}
        for info in found:
            if info.peer_id in unique:
                unique[info.peer_id].addrs.extend(a for a in info.addrs if a not in unique[info.peer_id].addrs)
            else:
                unique[info.peer_id] = PeerInfo(info.peer_id, list(info.addrs))
        return list(unique.values())

    async def _ask_closest(
        self, key: str, ask: Callable[[ID, bytes], Awaitable[list[Any]]], fanout: int = FAST_FANOUT
    ) -> list[Any]:
        """Run ``ask`` against the ``fanout`` closest known peers at once; gather answers."""
        key_bytes = _routing_key(key)
        closest = self.kad.routing_table.find_local_closest_peers(key_bytes, fanout)
        answers: list[Any] = []

        async def one(peer: ID) -> None:
            with trio.move_on_after(PER_PEER_QUERY_TIMEOUT):
                try:
                    answers.extend(await ask(peer, key_bytes))
                except Exception as exc:  # a dead or misbehaving peer: the slow path covers it
                    self.log.debug("fast DHT query failed", remote=str(peer), error=f"{type(exc).__name__}: {exc}")

        async with trio.open_nursery() as nursery:
            for peer in closest:
                nursery.start_soon(one, peer)
        return answers

    async def _providers_from(self, peer: ID, key_bytes: bytes) -> list[PeerInfo]:
        providers, _closer = await self.kad.provider_store._get_providers_from_peer_with_closers(peer, key_bytes)
        return list(providers)

    async def _value_from(self, peer: ID, key_bytes: bytes) -> list[bytes]:
        result = await self.kad.value_store._get_from_peer(peer, key_bytes)
        return [result] if isinstance(result, bytes) else []

    async def get_record(
        self, peer_id: str, *, known_models: Collection[str] | None = None, fresh: bool = True
    ) -> CapabilityRecord | None:
        """Fetch and verify ``peer_id``'s record; ``None`` (with the reason logged) if it fails."""
        key = record_key(peer_id)
        envelope = await self._get_value(key, fresh=fresh and peer_id != str(self.host.get_id()))
        if envelope is None:
            self.log.debug("no record found", subject=peer_id)  # normal: a stopped peer stays a provider for 48 h
            return None
        try:
            return verify_record(envelope, now=now_ms(), expected_peer_id=peer_id, known_models=known_models)
        except RecordError as exc:
            self.log.info("record dropped", subject=peer_id, reason=exc.message)
            return None

    async def _get_value(self, key: str, *, fresh: bool) -> bytes | None:
        """``get_value`` answers from the local replica when it has one; for a fresh read,
        set the replica aside, ask the network, and keep whichever copy is newer."""
        store = self.kad.value_store
        local = store.get(key.encode()) if fresh else None
        if local is not None:
            store.remove(key.encode())
        found: bytes | None = None
        try:
            found = await self._fast_get(key)
            if found is None:
                with trio.move_on_after(DHT_CALL_TIMEOUT):
                    found = await self.kad.get_value(key)
        finally:
            if local is not None:
                candidates = [local.value] + ([found] if found is not None else [])
                best = candidates[newest(candidates)]
                store.put(key.encode(), best)
                found = best
        return found

    async def _fast_get(self, key: str) -> bytes | None:
        """The newest valid value held by the closest peers we already know, or None."""
        validator = self.kad.validator
        assert validator is not None
        valid = []
        for value in await self._ask_closest(key, self._value_from):
            try:
                validator.validate(key, value)
                valid.append(value)
            except Exception:
                continue  # forged or stale copies lose here, as in get_value
        return valid[newest(valid)] if valid else None


def _routing_key(key: str) -> bytes:
    """The bytes py-libp2p routes a key by: provider keys hex-decoded, value keys UTF-8."""
    if key.startswith("/"):
        return key.encode()
    return _encode_key(key)
