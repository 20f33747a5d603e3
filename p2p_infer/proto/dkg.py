"""The threshold-key ritual among attested peers, and the release of decryption shares. Sans-IO.

A ritual (``protocols/dkg.md``) runs in three signed steps, every message signed by its
sender's Ed25519 key, and every sender checked to be an *attested* member (the caller's
``attested`` predicate: a verified, fresh attestation in its record, ``verify/tee.py``):

1. ``dkg_join``: each member publishes the ferveo public key it made (inside its enclave)
   for this ritual id.
2. ``dkg_deal``: once a member holds the joins of every listed member, it fixes the ritual
   (sorted members and their ferveo keys, threshold t) and sends every member its PVSS transcript.
3. ``dkg_key``: once it holds all n transcripts, it aggregates and checks them (ferveo) and
   signs the DKG public key with the member set and (t, n). A client uses the key only when
   all n members signed the same one (:func:`accept_key`).

Share release (:class:`ShareReleaser`): a member gives its decryption share for a request
only to an attested requester, only for a ciphertext bound to that request id (the AAD), and
only to the first requester that asks for that request id.

The crypto is behind :class:`DkgCrypto` (``verify/threshold.FerveoCrypto`` implements it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from ..errors import DkgRefused, ShareRefused
from ..identity import Identity, peer_id_from_public_key, verify_signature
from .wire import DKG_DEAL as DEAL
from .wire import DKG_JOIN as JOIN
from .wire import DKG_KEY as KEY

DOMAIN = b"p2p-infer/dkg/v1\n"
MIN_THRESHOLD = 2  # t = 1 would let any single member decrypt
MAX_MEMBERS = 32


class RitualLike(Protocol):
    ritual_id: int
    threshold: int
    members: tuple[tuple[str, bytes], ...]


class DkgCrypto(Protocol):
    public_key: bytes

    def deal(self, spec: Any, me: str) -> bytes: ...
    def aggregate(self, spec: Any, me: str, transcripts: Mapping[str, bytes]) -> tuple[bytes, bytes]: ...
    def share(self, spec: Any, me: str, aggregate: bytes, ciphertext: bytes, aad: bytes) -> bytes: ...


def sign_message(identity: Identity, kind: str, body: Sequence[Any]) -> dict[str, Any]:
    payload = msgpack.packb([kind, *body], use_bin_type=True)
    return {"type": kind, "body": payload, "signer": identity.public_key, "sig": identity.sign(DOMAIN + payload)}


def open_message(message: Mapping[str, Any], kind: str, attested: Callable[[str], bool]) -> tuple[str, list[Any]]:
    """(sender peer id, body fields) of a signed DKG message from an attested peer; DkgRefused otherwise."""
    payload, signer, sig = message.get("body"), message.get("signer"), message.get("sig")
    if not (isinstance(payload, bytes) and isinstance(signer, bytes) and len(signer) == 32 and isinstance(sig, bytes)):
        raise DkgRefused(f"{kind} must carry body, signer and sig as bytes")
    if not verify_signature(signer, DOMAIN + payload, sig):
        raise DkgRefused(f"{kind}: bad signature")
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except Exception:
        raise DkgRefused(f"{kind}: body is not msgpack") from None
    if not (isinstance(fields, list) and fields and fields[0] == kind):
        raise DkgRefused(f"expected a {kind} message")
    sender = peer_id_from_public_key(signer)
    if not attested(sender):
        raise DkgRefused(f"{kind} from {sender}, which has no verified attestation")
    return sender, fields[1:]


def spec_digest(ritual_id: int, threshold: int, members: Sequence[tuple[str, bytes]]) -> bytes:
    return hashlib.sha256(msgpack.packb([ritual_id, threshold, [list(m) for m in members]], use_bin_type=True)).digest()


@dataclass
class RitualMember:
    """One attested member's view of ritual ``ritual_id`` among ``expected`` peers with threshold t."""

    identity: Identity
    crypto: DkgCrypto
    ritual_id: int
    threshold: int
    expected: frozenset[str]  # the peer ids asked to take part (the attested opt-in peers)
    attested: Callable[[str], bool]
    make_spec: Callable[[int, int, tuple[tuple[str, bytes], ...]], Any]  # -> RitualSpec
    joins: dict[str, bytes] = field(default_factory=dict)
    transcripts: dict[str, bytes] = field(default_factory=dict)
    spec: Any = None
    aggregate: bytes = b""
    public_key: bytes = b""
    early: list[Mapping[str, Any]] = field(default_factory=list)  # deals that came before the last join

    def __post_init__(self) -> None:
        n = len(self.expected)
        if self.identity.peer_id not in self.expected or not MIN_THRESHOLD <= self.threshold <= n <= MAX_MEMBERS:
            raise DkgRefused(f"ritual needs {MIN_THRESHOLD} <= t <= n <= {MAX_MEMBERS} and this peer among its members (t={self.threshold}, n={n})")

    @property
    def me(self) -> str:
        return self.identity.peer_id

    def join(self) -> dict[str, Any]:
        """Our join message (also recorded as received, so a ritual can form without echo)."""
        self.joins[self.me] = self.crypto.public_key
        return sign_message(self.identity, JOIN, [self.ritual_id, self.threshold, sorted(self.expected), self.crypto.public_key])

    def on_message(self, message: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Handle a join, deal or key message; return the messages to send to every member."""
        kind = message.get("type")
        if kind == JOIN:
            return self._on_join(message)
        if kind == DEAL:
            return self._on_deal(message)
        raise DkgRefused(f"unexpected DKG message {kind!r}")

    def _on_join(self, message: Mapping[str, Any]) -> list[dict[str, Any]]:
        sender, (ritual, t, members, ferveo_key) = open_message(message, JOIN, self.attested)
        self._same_ritual(sender, ritual, t, members)
        if not isinstance(ferveo_key, bytes) or self.joins.get(sender, ferveo_key) != ferveo_key:
            raise DkgRefused(f"join of {sender}: missing or changed ferveo key")
        self.joins[sender] = ferveo_key
        if self.spec is not None or set(self.joins) != self.expected:
            return []
        members = tuple(sorted(self.joins.items()))
        self.spec = self.make_spec(self.ritual_id, self.threshold, members)
        transcript = self.crypto.deal(self.spec, self.me)
        digest = spec_digest(self.ritual_id, self.threshold, members)
        out = [sign_message(self.identity, DEAL, [self.ritual_id, digest, transcript]), *self._take_transcript(self.me, transcript)]
        pending, self.early = self.early, []
        for early in pending:
            out += self._on_deal(early)
        return out

    def _on_deal(self, message: Mapping[str, Any]) -> list[dict[str, Any]]:
        sender, (ritual, digest, transcript) = open_message(message, DEAL, self.attested)
        if ritual != self.ritual_id or sender not in self.expected:
            raise DkgRefused(f"deal from {sender}, not a member of ritual {self.ritual_id}")
        if self.spec is None:
            if len(self.early) >= len(self.expected):
                raise DkgRefused(f"deal from {sender} before the ritual formed here, and {len(self.early)} wait already")
            self.early.append(message)  # handled once the last join arrives
            return []
        if digest != spec_digest(self.spec.ritual_id, self.spec.threshold, self.spec.members):
            raise DkgRefused(f"deal from {sender} is for another member set or threshold")
        if sender in self.transcripts:
            raise DkgRefused(f"second transcript from {sender}")
        if not isinstance(transcript, bytes):
            raise DkgRefused(f"deal from {sender}: transcript must be bytes")
        return self._take_transcript(sender, transcript)

    def _take_transcript(self, sender: str, transcript: bytes) -> list[dict[str, Any]]:
        self.transcripts[sender] = transcript
        if set(self.transcripts) != self.expected or self.public_key:
            return []
        self.aggregate, self.public_key = self.crypto.aggregate(self.spec, self.me, self.transcripts)
        return [self.key_message()]

    def key_message(self) -> dict[str, Any]:
        members = [list(m) for m in self.spec.members]
        return sign_message(self.identity, KEY, [self.ritual_id, self.threshold, members, self.public_key,
                                                 hashlib.sha256(self.aggregate).digest()])

    def _same_ritual(self, sender: str, ritual: Any, t: Any, members: Any) -> None:
        if sender not in self.expected:
            raise DkgRefused(f"join from {sender}, which is not a listed member of ritual {self.ritual_id}")
        if (ritual, t, members) != (self.ritual_id, self.threshold, sorted(self.expected)):
            raise DkgRefused(f"join from {sender} is for another ritual, threshold or member list")


@dataclass(frozen=True)
class ThresholdKey:
    """A DKG public key every member signed, with its members and (t, n)."""

    ritual_id: int
    threshold: int
    members: tuple[str, ...]
    public_key: bytes

    @property
    def n(self) -> int:
        return len(self.members)


def accept_key(messages: Sequence[Mapping[str, Any]], attested: Callable[[str], bool]) -> ThresholdKey:
    """The ritual's key, if every member (each attested) signed the same ritual, members, t and key."""
    seen: dict[str, tuple[Any, ...]] = {}
    for message in messages:
        sender, (ritual, t, members, key, aggregate_hash) = open_message(message, KEY, attested)
        seen[sender] = (ritual, t, tuple(p for p, _ in members), key, aggregate_hash)
    if not seen:
        raise DkgRefused("no key messages")
    values = set(seen.values())
    if len(values) != 1:
        raise DkgRefused(f"members signed {len(values)} different keys or member sets")
    ritual, t, members, key, _ = values.pop()
    missing = sorted(set(members) - set(seen))
    if missing:
        raise DkgRefused(f"key not signed by member(s) {missing}")
    if not (MIN_THRESHOLD <= t <= len(members)) or set(seen) - set(members):
        raise DkgRefused("key messages name a bad threshold or come from non-members")
    return ThresholdKey(ritual, t, members, key)


@dataclass
class ShareReleaser:
    """A member's rule for giving out its decryption share of request ciphertexts."""

    member: RitualMember
    aad_for: Callable[[int, bytes], bytes]  # (ritual id, request id) -> the AAD requests are bound to
    released: dict[bytes, str] = field(default_factory=dict)  # request id -> the one requester it went to

    def release(self, requester: str, request_id: bytes, ciphertext: bytes) -> bytes:
        """My share for ``ciphertext`` of ``request_id``; ShareRefused names why not."""
        if not self.member.public_key:
            raise ShareRefused(f"ritual {self.member.ritual_id} has no key here yet")
        if not self.member.attested(requester):
            raise ShareRefused(f"share requested by {requester}, which has no verified attestation on the allow-list")
        first = self.released.setdefault(request_id, requester)
        if first != requester:
            raise ShareRefused(f"share for request {request_id.hex()[:16]} already released to another peer")
        aad = self.aad_for(self.member.ritual_id, request_id)
        return self.member.crypto.share(self.member.spec, self.member.me, self.member.aggregate, ciphertext, aad)
