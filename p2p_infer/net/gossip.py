"""Gossipsub for audit traffic: commitments, reveals, verdicts and fault evidence.

Gossip is never on a query's critical path (py-libp2p needs tens of ms per round): members
send commits and reveals to the client directly and *also* publish them here so every peer
can audit and keep reputation. Settings follow ``notes/libp2p.md``: strict message signing,
heartbeat 1 s (default 120 s), explicit mesh degrees, spam protection off (it drops our own
bursts), subscription drained by a dedicated task, messages kept well under 1 MiB.

Hygiene (gossip is anyone's input and ends up in every peer's audit log): a topic validator
refuses messages over ``MAX_GOSSIP_BYTES`` (``verdicts`` over ``MAX_VERDICTS_BYTES``), so
they are neither handled nor relayed; message ids are content-addressed (the SHA-256 of the
payload), so a payload re-published under another signer or seqno is a duplicate to
gossipsub too; and ids already handled are remembered (``SEEN_IDS``) well past gossipsub's
120 s seen-cache, so a replay much later is not handled twice.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import structlog
import trio
from libp2p.abc import IHost
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import ContentAddressedMessageIDGenerator, Pubsub
from libp2p.tools.anyio_service import background_trio_service

from ..bounded import trim_oldest
from ..errors import ProtocolViolation
from ..proto.committee_codec import batches, unbatch
from ..proto.wire import CONSENSUS_TOPIC, MAX_GOSSIP_BYTES, REQUESTS, ROUND, VERDICTS, message_type

GOSSIP_DELAY = 0.5  # seconds: audit traffic waits until the query has moved on
MAX_VERDICTS_BYTES = 64 * 1024  # 64 stages of 64 members' verdicts fit several times over
SEEN_IDS = 50_000  # handled message ids remembered (32 bytes each)
log = structlog.get_logger("p2p_infer.gossip")

GossipHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


class Gossip:
    def __init__(self, pubsub: Pubsub) -> None:
        self.pubsub = pubsub
        self.pending = 0
        self.rounds: list[dict[str, Any]] = []  # this node's rounds waiting for the next batch

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait for scheduled publishes to go out (a client about to leave calls this)."""
        with trio.move_on_after(timeout):
            while self.pending:
                await trio.sleep(0.01)
            await trio.sleep(0.1)  # let the router hand the last frames to the connections

    async def publish(self, message: dict[str, Any]) -> None:
        data = msgpack.packb(message, use_bin_type=True)
        if len(data) > MAX_GOSSIP_BYTES:
            log.warning("gossip message too large, not sent", type=message.get("type"), size=len(data))
            return
        try:
            await self.pubsub.publish(CONSENSUS_TOPIC, data)
        except Exception as exc:  # gossip is best effort: never fail the caller's real work
            log.info("gossip publish failed", type=message.get("type"), error=f"{type(exc).__name__}: {exc}")

    async def _publish_later(self, message: dict[str, Any]) -> None:
        try:
            await trio.sleep(GOSSIP_DELAY)  # let the reply on the critical path go out first
            await self.publish(message)
        finally:
            self.pending -= 1

    async def _publish_rounds_later(self) -> None:
        try:
            await trio.sleep(GOSSIP_DELAY)  # a query's other stages' rounds join the batch meanwhile
            batch, self.rounds = self.rounds, []
            for message in batches(batch):
                await self.publish(message)
        finally:
            self.pending -= 1

    def publish_soon(self, nursery: trio.Nursery, message: dict[str, Any]) -> None:
        """Publish after GOSSIP_DELAY. Rounds are batched: every round handed in within one
        delay goes out as one ``rounds`` message (one signature and one trip through the
        mesh for a query's stages instead of one each), within the size limits."""
        batched = message_type(message) == ROUND
        if batched:
            self.rounds.append(message)
            if len(self.rounds) > 1:
                return  # a flush is already scheduled
        try:
            nursery.start_soon(self._publish_rounds_later if batched else self._publish_later, *(() if batched else (message,)))
            self.pending += 1
        except RuntimeError:  # shutting down: the nursery takes no more work, and gossip is best effort
            log.debug("gossip dropped at shutdown", type=message.get("type"))


@asynccontextmanager
async def running_gossip(host: IHost, handle: GossipHandler) -> AsyncIterator[Gossip]:
    """Start gossipsub, subscribe to the consensus topic, and feed ``handle(sender, message)``."""
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,  # IP diversity cannot hold on one host; reputation guards instead
    )
    pubsub = Pubsub(host, router, strict_signing=True, msg_id_constructor=ContentAddressedMessageIDGenerator())
    pubsub.set_topic_validator(CONSENSUS_TOPIC, acceptable_size, False)
    protocols = list(router.get_protocols())
    for protocol in protocols:  # an exception escaping a stream handler kills the host (notes, bug 3)
        host.set_stream_handler(protocol, _guarded(pubsub.stream_handler))
    try:
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            subscription = await pubsub.subscribe(CONSENSUS_TOPIC)
            gossip = Gossip(pubsub)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, subscription, host.get_id().to_bytes(), handle)
                try:
                    yield gossip
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        for protocol in protocols:  # streams arriving after pubsub stopped must not reach it
            host.remove_stream_handler(protocol)


def acceptable_size(_peer: Any, msg: Any) -> bool:
    """Gossipsub topic validator (synchronous; a refused message is neither handled nor
    relayed): a msgpack map of a consensus type, within its size limit."""
    size = len(msg.data)
    if size > MAX_GOSSIP_BYTES:
        log.info("oversized gossip refused", size=size)
        return False
    try:
        kind = message_type(msgpack.unpackb(msg.data, raw=False))
    except Exception:
        return False
    if kind not in REQUESTS[CONSENSUS_TOPIC] or (kind == VERDICTS and size > MAX_VERDICTS_BYTES):
        log.info("gossip refused", type=kind, size=size)
        return False
    return True


async def _drain(subscription: Any, own_id: bytes, handle: GossipHandler) -> None:
    seen: OrderedDict[bytes, None] = OrderedDict()
    while True:
        msg = await subscription.get()
        if msg.from_id == own_id:
            continue
        message_id = hashlib.sha256(msg.data).digest()
        if message_id in seen:  # a replay after gossipsub's own seen-cache forgot it
            continue
        seen[message_id] = None
        trim_oldest(seen, SEEN_IDS)
        try:
            message = msgpack.unpackb(msg.data, raw=False)
            if not isinstance(message, dict):
                raise ProtocolViolation("gossip message is not a map")
            sender = _sender(msg.from_id)
            for item in unbatch(message):  # a batch's rounds are each handled as if sent alone
                await handle(sender, item)
        except Exception as exc:  # one bad message must not stop auditing
            log.info("gossip message dropped", error=f"{type(exc).__name__}: {exc}")


def _guarded(handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    async def guarded(stream: Any) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            log.debug("pubsub stream ended with an error", error=f"{type(exc).__name__}: {exc}")
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass

    return guarded


def _sender(from_id: bytes) -> str:
    from libp2p.peer.id import ID

    try:
        return ID(from_id).to_base58()
    except Exception:
        return "?"
