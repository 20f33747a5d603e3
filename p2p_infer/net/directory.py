"""A client's refreshed view of the overlay: who is alive, what they serve, verified.

Queries never wait on the DHT: the client refreshes this view in the background and
routes from what it already holds (``notes/libp2p.md``: a lookup costs 60-80 ms of
py-libp2p CPU). Every record is verified on the way in; what fails is dropped with a
logged reason. A record's TEE attestation is verified too (``verify/tee.py``): a peer whose
attestation fails (forged, stale, wrong measurement) stays listed but is not attested, and
the reason is logged.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import structlog
import trio
from libp2p.peer.id import ID

from .dht import Discovery
from ..clock import now_ms
from ..errors import TeeError
from ..proto.records import CapabilityRecord, ShardSpec, all_peers_key, model_key
from ..verify.tee import Attested, Policy, check_record

log = structlog.get_logger("p2p_infer.directory")
FETCH_CONCURRENCY = 8


class Directory:
    def __init__(self, discovery: Discovery, known_models: Collection[str] | Mapping[str, Any], tee_policy: Policy | None = None) -> None:
        self.discovery = discovery
        self.known_models = set(known_models)
        # manifests (model id -> Manifest) measure attested layers; a bare id list measures none
        self.manifests: Mapping[str, Any] = known_models if isinstance(known_models, Mapping) else {}
        self.tee_policy = tee_policy or Policy.default()
        self.records: dict[str, CapabilityRecord] = {}
        self.attestations: dict[str, Attested] = {}  # peer id -> its verified attestation
        self.refreshed = trio.Event()

    async def refresh(self, model_ids: Collection[str] = ()) -> dict[str, CapabilityRecord]:
        """Find peers (member list, per-model providers, routing table) and fetch their records."""
        candidates: set[str] = set()
        for key in [all_peers_key(), *(model_key(m) for m in model_ids)]:
            candidates.update(str(info.peer_id) for info in await self.discovery.find_providers(key))
        candidates.update(str(p) for p in self.discovery.kad.routing_table.get_peer_ids())
        candidates.discard(str(self.discovery.host.get_id()))
        fetched: dict[str, CapabilityRecord] = {}
        limiter = trio.CapacityLimiter(FETCH_CONCURRENCY)

        async def fetch(peer_id: str) -> None:
            async with limiter:
                record = await self.discovery.get_record(peer_id, known_models=self.known_models)
            if record is not None:
                fetched[peer_id] = record
                self._remember_addrs(record)

        async with trio.open_nursery() as nursery:
            for peer_id in sorted(candidates):
                nursery.start_soon(fetch, peer_id)
        self.records = fetched
        self.attestations = {p: a for p, a in ((p, self._attest(r)) for p, r in fetched.items()) if a is not None}
        self.refreshed.set()
        log.debug("directory refreshed", peers=len(fetched), candidates=len(candidates))
        return fetched

    def _attest(self, record: CapabilityRecord) -> Attested | None:
        if record.tee == "none":
            return None
        try:
            return check_record(record, self.manifests, self.tee_policy, now_ms())
        except TeeError as exc:
            log.warning("attestation ignored", subject=record.peer_id, tee=record.tee, reason=exc.message)
            return None

    def attested(self, peer_id: str) -> Attested | None:
        """The peer's verified attestation, if it is still fresh."""
        found = self.attestations.get(peer_id)
        return found if found is not None and found.fresh(now_ms()) else None

    def _remember_addrs(self, record: CapabilityRecord) -> None:
        import multiaddr

        try:
            addrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in record.addrs]
            self.discovery.host.get_peerstore().add_addrs(ID.from_base58(record.peer_id), addrs, 600)
        except Exception as exc:
            log.info("unusable addresses in record", subject=record.peer_id, error=str(exc))

    def live(self) -> list[CapabilityRecord]:
        now = now_ms()
        return [r for r in self.records.values() if not r.is_expired(now)]

    def shards_of(self, model_id: str) -> list[tuple[CapabilityRecord, ShardSpec]]:
        return [(r, s) for r in self.live() for s in r.shards if s.model_id == model_id]

    def forget(self, peer_id: str) -> None:
        self.records.pop(peer_id, None)
