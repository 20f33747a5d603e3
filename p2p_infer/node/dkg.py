"""The threshold-key driver (``/p2p-infer/dkg/1.0.0``, ``protocols/dkg.md``): a thin trio shell
around ``proto/dkg.py``.

On an attested peer that opts in (``--threshold-member``) it waits until its directory lists
``dkg_members`` attested peers that advertise the protocol, takes the first ``dkg_members``
peer ids in sorted order (every member computes the same set from the same records), and
runs the ritual by sending its join, deal and key messages to every other member. On every
attested peer it serves enhanced-privacy stages: it gathers t decryption shares for the
request from members, decrypts, runs its layers and seals the output to the client's
ephemeral key. The client side (:func:`run_private`) is here too.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import msgpack
import structlog
import trio

from ..clock import now_ms
from ..errors import DkgRefused, NotEnoughShares, P2PInferError, ProtocolViolation, ThresholdError
from ..ml.tensors import activation_from_wire, decode_tensor, encode_optional, encode_tensor
from ..net.framing import remote_peer
from ..proto.dkg import RitualMember, ShareReleaser, ThresholdKey, accept_key
from ..proto.wire import (DKG_DEAL, DKG_JOIN, DKG_KEY, DKG_PROTOCOL, GET_DKG_KEY, OK, PRIVATE_FORWARD, PRIVATE_RESULT, SHARE,
                          SHARE_REQUEST, Message, expect, expect_reply)
from ..verify import threshold
from .forward_handler import dump_request

if TYPE_CHECKING:
    from ..net.directory import Directory
    from .peer import Peer

log = structlog.get_logger("p2p_infer.dkg")
SEND_TRIES = 20  # a member not yet formed refuses; it is asked again a second later
FORM_POLL_S = 1.0
REFRESH_S = 10.0


class DkgNode:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.crypto = threshold.FerveoCrypto()  # made in this (attested) process, never leaves it
        self.directory: Directory | None = None
        self.member: RitualMember | None = None
        self.releaser: ShareReleaser | None = None

    def attested(self, peer_id: str) -> bool:
        return peer_id == self.peer.identity.peer_id or (self.directory is not None and self.directory.attested(peer_id) is not None)

    async def run(self, directory: Directory) -> None:
        """Refresh the view of attested peers; form the ritual (members only) as soon as it can."""
        self.directory = directory
        while True:
            try:
                await directory.refresh(list(directory.known_models))
                if self.peer.settings.threshold_member and self.member is None:
                    self._maybe_form()
            except P2PInferError as exc:  # a refresh or a ritual that cannot form is retried, never fatal to the peer
                log.warning("dkg round skipped", reason=exc.message)
            await trio.sleep(FORM_POLL_S if self.member is None or not self.member.public_key else REFRESH_S)

    def _maybe_form(self) -> None:
        assert self.directory is not None
        settings, me = self.peer.settings, self.peer.identity.peer_id
        candidates = sorted({me} | {p for p, r in self.directory.records.items() if DKG_PROTOCOL in r.protocols and self.attested(p)})
        if len(candidates) < settings.dkg_members:
            return
        expected = frozenset(candidates[:settings.dkg_members])
        if me not in expected:
            log.info("not among the ritual's members", ritual=settings.dkg_ritual, members=sorted(expected))
            return
        self.member = RitualMember(self.peer.identity, self.crypto, settings.dkg_ritual, settings.dkg_threshold, expected,
                                   self.attested, threshold.RitualSpec)
        self.releaser = ShareReleaser(self.member, threshold.request_aad)
        log.info("ritual formed", ritual=settings.dkg_ritual, n=len(expected), t=settings.dkg_threshold)
        self._send_all([self.member.join()])

    def _send_all(self, messages: list[Message]) -> None:
        assert self.member is not None
        for message in messages:
            if message["type"] == DKG_KEY:
                log.info("threshold key ready", ritual=self.member.ritual_id, key=bytes(message["body"])[-40:].hex()[:16])
                continue
            for peer_id in sorted(self.member.expected - {self.member.me}):
                self.peer.start_background(self._send, peer_id, message)

    async def _send(self, peer_id: str, message: Message) -> None:
        assert self.peer.pool is not None
        for _ in range(SEND_TRIES):
            try:
                await self.peer.pool.request(peer_id, DKG_PROTOCOL, message, timeout=10)
                return
            except P2PInferError as exc:
                log.debug("dkg message not taken yet", to=peer_id, type=message["type"], reason=exc.message)
                await trio.sleep(1.0)
        log.warning("dkg message never delivered", to=peer_id, type=message["type"])

    # ---- the protocol handler ----

    async def handle(self, message: Message) -> Message:
        dump_request(message)  # P2P_INFER_DUMP_DIR: what a recording peer (the host outside the enclave) sees
        kind = expect(DKG_PROTOCOL, message)
        if kind in (DKG_JOIN, DKG_DEAL):
            if self.member is None:
                raise DkgRefused("no ritual formed on this peer yet")
            self._send_all(self.member.on_message(message))
            return {"type": OK}
        if kind == GET_DKG_KEY:
            if self.member is None or not self.member.public_key:
                raise ThresholdError("no threshold key on this peer yet")
            return self.member.key_message()
        if kind == SHARE_REQUEST:
            return await self._share(message)
        return await self._private_forward(message)

    async def _share(self, message: Message) -> Message:
        if self.releaser is None:
            raise ThresholdError("this peer holds no threshold share")
        requester = remote_peer.get()
        if not self.attested(requester) and self.directory is not None:
            await self.directory.refresh(list(self.directory.known_models))  # maybe a new executor
        request_id, ciphertext = _bytes(message, "request_id"), _bytes(message, "ciphertext")
        share = await trio.to_thread.run_sync(self.releaser.release, requester, request_id, ciphertext)
        return {"type": SHARE, "share": share}

    async def _private_forward(self, message: Message) -> Message:
        """Decrypt with t shares, run the layers, seal the output to the client's ephemeral key."""
        key = self._key()
        request_id, ciphertext, client_key = _bytes(message, "request_id"), _bytes(message, "ciphertext"), _bytes(message, "client_key")
        aad = threshold.request_aad(key.ritual_id, request_id)
        shares = await self._gather_shares(key, request_id, ciphertext)
        plain = await trio.to_thread.run_sync(threshold.combine_and_decrypt, ciphertext, aad, shares, key.threshold)
        try:
            hidden, mask = msgpack.unpackb(plain, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise ProtocolViolation("private_forward plaintext must be msgpack [hidden, mask]") from None
        assert self.peer.shards is not None
        model_id, first, last = message.get("model_id"), message.get("first"), message.get("last")
        if not (isinstance(model_id, str) and isinstance(first, int) and isinstance(last, int)):
            raise ProtocolViolation("private_forward needs model_id, first and last")
        act = activation_from_wire(hidden, mask)
        model = self.peer.shards.check(model_id, first, last, act)
        out, compute_ms, _ = await self.peer.compute(model, first, last, act)
        sealed = threshold.seal(msgpack.packb(encode_tensor(out), use_bin_type=True), client_key)
        return {"type": PRIVATE_RESULT, "sealed": sealed, "compute_ms": compute_ms, "shares": len(shares)}

    def _key(self) -> ThresholdKey:
        if self.member is not None and self.member.public_key:
            members = tuple(p for p, _ in self.member.spec.members)
            return ThresholdKey(self.member.ritual_id, self.member.threshold, members, self.member.public_key)
        raise ThresholdError("this executor is not a member of a ritual with a key")

    async def _gather_shares(self, key: ThresholdKey, request_id: bytes, ciphertext: bytes) -> list[bytes]:
        """My own share, then other members' until t; NotEnoughShares when they refuse."""
        assert self.member is not None and self.peer.pool is not None
        me = self.peer.identity.peer_id
        aad = threshold.request_aad(key.ritual_id, request_id)
        shares = [await trio.to_thread.run_sync(self.crypto.share, self.member.spec, me, self.member.aggregate, ciphertext, aad)]
        refused = []
        for peer_id in [p for p in key.members if p != me]:
            if len(shares) >= key.threshold:
                break
            try:
                reply = await self.peer.pool.request(peer_id, DKG_PROTOCOL, {"type": SHARE_REQUEST, "request_id": request_id,
                                                                            "ciphertext": ciphertext}, timeout=10)
                shares.append(_bytes(expect_reply(reply, SHARE), "share"))
            except P2PInferError as exc:
                refused.append(f"{peer_id[-8:]}: {exc.message}")
        if len(shares) < key.threshold:
            raise NotEnoughShares(f"{len(shares)} of {key.threshold} decryption shares ({'; '.join(refused)})")
        return shares


def _bytes(message: Message, name: str) -> bytes:
    value = message.get(name)
    if not isinstance(value, bytes) or not value:
        raise ProtocolViolation(f"{message.get('type')} needs {name} as bytes")
    return value


# ---- the client's side ----


async def fetch_key(client: Any) -> ThresholdKey:
    """The threshold key every member signed, asked of every attested peer that serves the protocol
    (kept for the client's lifetime once accepted)."""
    if getattr(client, "threshold_key", None) is not None:
        return client.threshold_key  # type: ignore[no-any-return]
    directory = client.directory
    members = sorted(p for p, r in directory.records.items() if DKG_PROTOCOL in r.protocols and directory.attested(p))
    messages = []
    for peer_id in members:
        try:
            messages.append(expect_reply(await client.pool.request(peer_id, DKG_PROTOCOL, {"type": GET_DKG_KEY}, timeout=10), DKG_KEY))
        except P2PInferError as exc:
            log.info("no threshold key from peer", peer=peer_id, reason=exc.message)
    if not messages:
        raise ThresholdError(f"--enhanced-privacy: no threshold key ({len(members)} attested peer(s) serve {DKG_PROTOCOL})")
    client.threshold_key = accept_key(messages, lambda p: directory.attested(p) is not None)
    return client.threshold_key  # type: ignore[no-any-return]


async def run_private(client: Any, model: Any, act: Any) -> tuple[Any, dict[str, Any]]:
    """Each remaining stage sent encrypted to the threshold key; each result sealed back to us."""
    from ..ml.models import Activation
    from .results import HopReport

    key = await fetch_key(client)
    route = await client._plan_or_refresh(model, client.local_layers, ())
    hops = []
    hidden = act.hidden
    for segment in route:
        request_id = os.urandom(16)
        plain = msgpack.packb([encode_tensor(hidden), encode_optional(act.mask)], use_bin_type=True)
        ciphertext = threshold.encrypt(plain, threshold.request_aad(key.ritual_id, request_id), key.public_key)
        mine = threshold.ephemeral_key()
        started = time.perf_counter()
        reply = expect_reply(await client.pool.request(segment.peer_id, DKG_PROTOCOL, {
            "type": PRIVATE_FORWARD, "request_id": request_id, "ciphertext": ciphertext, "client_key": bytes(mine.public_key),
            "model_id": model.model_id, "first": segment.first, "last": segment.last}, timeout=client.request_timeout), PRIVATE_RESULT)
        hidden = decode_tensor(msgpack.unpackb(threshold.open_sealed(_bytes(reply, "sealed"), mine), raw=False), field="output")
        hops.append(HopReport(segment.peer_id, segment.first, segment.last, float(reply.get("compute_ms", 0.0)),
                              round_trip_ms=(time.perf_counter() - started) * 1000))
    privacy = {"ritual": key.ritual_id, "threshold": key.threshold, "members": list(key.members), "checked_at_ms": now_ms()}
    return Activation(hidden, act.mask), {"route": hops, "mode": f"enhanced-privacy t={key.threshold} of n={key.n}", "privacy": privacy}
