"""The wire vocabulary: every protocol id, gossip topic and message type, in one place.

Every message, on a stream or in gossip, is a msgpack map keyed by ``type`` (framing:
``protocols/framing.md``). :func:`expect` checks that a message is one its protocol
allows, so each handler dispatches on names defined here and nowhere else. The typed
messages of each protocol live in its codec module (``proto/forward.py``,
``proto/committee_codec.py``, ...); this module holds the names they share.
"""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolViolation

Message = dict[str, Any]


def protocol_id(name: str, version: str = "1.0.0") -> str:
    """Every protocol is versioned: ``/p2p-infer/<name>/<version>``."""
    return f"/p2p-infer/{name}/{version}"


# ---- stream protocols ----
FORWARD_PROTOCOL = protocol_id("forward")
RESULT_PROTOCOL = protocol_id("forward-result")
# 2.0.0: execute carries the client-signed candidate set (a member checks it was selected),
# tasks name their client and request time, commits bind the candidate set
# 3.0.0: one round trip per stage: execute is answered with the signed commit, the signed
# reveal and the output together (no reveal request); members gossip the round only once
# the commit deadline has passed
# 4.0.0: one ticket per candidate and query (seed = H(request_hash)); stage i, attempt a
# ranks the tickets by H(beta, i, a), so each VRF proof is made and verified once per query
# 5.0.0: one ticket per candidate and client session (seed = H(client_key, session), the
# task's 12th field); the request's stage i, attempt a ranks by H(beta, request_hash, i, a)
COMMITTEE_PROTOCOL = protocol_id("committee", "5.0.0")
ARTIFACT_PROTOCOL = protocol_id("artifact")
# generation sessions with a KV cache (protocols/session.md); 2.0.0: forwarded decode (steps passed
# peer to peer along the route, upstream links, client rewinds), commitments bind input and output hashes
SESSION_PROTOCOL = protocol_id("session", "2.0.0")
SERVED_PROTOCOLS = (FORWARD_PROTOCOL, COMMITTEE_PROTOCOL, ARTIFACT_PROTOCOL, SESSION_PROTOCOL)  # advertised in records
DKG_PROTOCOL = protocol_id("dkg")  # threshold key ritual, share release, enhanced-privacy stages (protocols/dkg.md)

# ---- gossip ----
# v2: messages keyed by "type" like every stream message (v1 used "kind").
# v3: rounds carry the candidate set, evidence counts only against its committee.
# v4: candidate sets rank by the committee/4.0.0 draw (a v3 auditor would pick other committees).
# v5: committee/5.0.0 tasks; evidence may be optimistic-mode mismatch evidence; "rounds" batches.
CONSENSUS_TOPIC = "p2p-infer/consensus/v6"
MAX_GOSSIP_BYTES = 900 * 1024

# ---- message types ----
ERROR = "error"
# forward protocol
FORWARD = "forward"
FORWARD_RESULT = "forward_result"
FORWARD_FAILED = "forward_failed"
ACCEPTED = "accepted"
OK = "ok"
PING = "ping"
PONG = "pong"
GET_PROOF = "get_proof"
PROOF = "proof"
# committee protocol (request and reply share a name where the spec says so)
TICKET = "ticket"
EXECUTE = "execute"
COMMIT = "commit"
REVEAL = "reveal"
RESULT = "result"  # the reply to execute (since 3.0.0): commit + reveal + output
# artifact protocol
ARTIFACT = "artifact"
# session protocol
SESSION_OPEN = "session_open"
SESSION_OPENED = "session_opened"
SESSION_STEP = "session_step"
SESSION_OUTPUT = "session_output"
SESSION_CLOSE = "session_close"
SESSION_CLOSED = "session_closed"
SESSION_LINK = "session_link"
SESSION_LINKED = "session_linked"
SESSION_FORWARDED = "session_forwarded"
# dkg protocol
DKG_JOIN = "dkg_join"
DKG_DEAL = "dkg_deal"
DKG_KEY = "dkg_key"  # a member's signed key (the reply to get_dkg_key)
GET_DKG_KEY = "get_dkg_key"
SHARE_REQUEST = "share_request"
SHARE = "share"
PRIVATE_FORWARD = "private_forward"
PRIVATE_RESULT = "private_result"
# consensus gossip
ROUND = "round"
ROUNDS = "rounds"  # v5: a member's rounds of one moment, in one gossip message
VERDICTS = "verdicts"
EVIDENCE = "evidence"
CHECKPOINT = "checkpoint"  # a peer's signed audit-log head (proto/checkpoints.py); additive on topic v3

REQUESTS: dict[str, frozenset[str]] = {
    FORWARD_PROTOCOL: frozenset({FORWARD, PING, GET_PROOF}),
    RESULT_PROTOCOL: frozenset({FORWARD_RESULT, FORWARD_FAILED}),
    COMMITTEE_PROTOCOL: frozenset({TICKET, EXECUTE}),
    ARTIFACT_PROTOCOL: frozenset({ARTIFACT}),
    SESSION_PROTOCOL: frozenset({SESSION_OPEN, SESSION_STEP, SESSION_CLOSE, SESSION_LINK}),
    DKG_PROTOCOL: frozenset({DKG_JOIN, DKG_DEAL, GET_DKG_KEY, SHARE_REQUEST, PRIVATE_FORWARD}),
    CONSENSUS_TOPIC: frozenset({ROUND, ROUNDS, VERDICTS, EVIDENCE, CHECKPOINT}),
}


def is_int(value: Any) -> bool:
    """An integer on the wire: msgpack's booleans are Python ints, and never count as one."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_bin(value: Any, size: int) -> bool:
    """A ``bin`` field of exactly ``size`` bytes (hashes, keys, nonces, signatures)."""
    return isinstance(value, bytes) and len(value) == size


def message_type(message: Message) -> str:
    kind = message.get("type")
    return kind if isinstance(kind, str) else ""


def expect(protocol: str, message: Message) -> str:
    """The message's type, if ``protocol`` allows it as a request; else ProtocolViolation."""
    kind = message_type(message)
    if kind not in REQUESTS[protocol]:
        raise ProtocolViolation(f"unknown message type {message.get('type')!r} on {protocol}")
    return kind


def expect_reply(message: Message, kind: str) -> Message:
    """A reply must be of the one type its request calls for."""
    if message_type(message) != kind:
        raise ProtocolViolation(f"expected {kind}, got {message.get('type')!r}")
    return message
