"""Signed, expiring capability records, and the DHT key layout they live under.

Sans-IO: encoding, signing and verification are plain functions. The wire format is
specified in ``protocols/records.md``; ``protocols/test-vectors/record.json`` pins the
exact bytes and signature for a fixed key, and a test checks the code against it.

Envelope: ``msgpack([1, body, signature])`` where ``body`` is the msgpack array of the
record's fields in a fixed order and ``signature = Ed25519(DOMAIN || body)``. Signing the
encoded body (rather than re-encoding a parsed record) means a verifier never has to
reproduce an encoding to check a signature.

Schema 2 (same fields as 1) adds one rule: the signing key solves the identity puzzle
(``identity.PUZZLE_DIFFICULTY``). Schema 1 records came from keys that need not, so they
are refused rather than read with the old rules. Schema 3 (same fields) is a record that
carries a TEE attestation: ``tee`` names a TEE kind and ``tee_attestation`` is an
attestation envelope (``protocols/tee.md``) that readers verify before they count the peer
as attested. Records without a TEE stay schema 2, so a schema 2 record with a TEE is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import msgpack

from ..errors import RecordError
from ..identity import PUZZLE_DIFFICULTY, Identity, peer_id_from_public_key, solves_puzzle, verify_signature

SCHEMA_VERSION = 2  # records without a TEE
TEE_SCHEMA_VERSION = 3  # records carrying a TEE kind and attestation (protocols/tee.md)
READABLE_SCHEMAS = (SCHEMA_VERSION, TEE_SCHEMA_VERSION)
MAX_ATTESTATION_BYTES = 12 * 1024  # a DCAP quote (~5 KiB) with its collateral fits
ENVELOPE_VERSION = 1
SIGNING_DOMAIN = b"p2p-infer/capability-record/v1\n"
MAX_RECORD_BYTES = 16 * 1024
MAX_LIFETIME_MS = 24 * 3600 * 1000
CLOCK_SKEW_MS = 30_000
KEY_NAMESPACE = "p2p-infer"
TEE_KINDS = ("none", "simulated", "sgx", "sev-snp", "tdx")


@dataclass(frozen=True, order=True)
class ShardSpec:
    """A contiguous, inclusive range of layers of one model."""

    model_id: str
    first: int
    last: int

    def __post_init__(self) -> None:
        if not (0 <= self.first <= self.last):
            raise RecordError(f"bad layer range {self.first}-{self.last}")

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    def __str__(self) -> str:
        return f"{self.model_id[:12]}:{self.first}-{self.last}"


@dataclass(frozen=True)
class CapabilityRecord:
    peer_id: str
    public_key: bytes
    addrs: tuple[str, ...]
    shards: tuple[ShardSpec, ...]
    throughput: float  # layer forwards per second, measured by the peer at start
    load: float  # in-flight requests / capacity, 0 = idle
    tee: str = "none"
    tee_attestation: bytes = b""
    software: str = ""
    protocols: tuple[str, ...] = ()
    issued_at_ms: int = 0
    expires_at_ms: int = 0
    schema: int = field(default=SCHEMA_VERSION)
    # the signed envelope this record was read from (b"" for one built locally): certificates
    # carry it so a third party can check the record without the DHT
    envelope: bytes = field(default=b"", compare=False, repr=False)

    def is_expired(self, now_ms: int) -> bool:
        return now_ms >= self.expires_at_ms


def body_fields(record: CapabilityRecord) -> list[object]:
    return [
        record.schema,
        record.peer_id,
        record.public_key,
        list(record.addrs),
        [[s.model_id, s.first, s.last] for s in record.shards],
        float(record.throughput),
        float(record.load),
        record.tee,
        record.tee_attestation,
        record.software,
        list(record.protocols),
        record.issued_at_ms,
        record.expires_at_ms,
    ]


def encode_body(record: CapabilityRecord) -> bytes:
    return msgpack.packb(body_fields(record), use_bin_type=True)


def sign_record(record: CapabilityRecord, identity: Identity) -> bytes:
    """Return the signed envelope bytes that go into the DHT."""
    if record.public_key != identity.public_key or record.peer_id != identity.peer_id:
        raise RecordError("a record can only be signed by the key it names")
    body = encode_body(record)
    signature = identity.sign(SIGNING_DOMAIN + body)
    return msgpack.packb([ENVELOPE_VERSION, body, signature], use_bin_type=True)


def make_record(
    identity: Identity,
    *,
    addrs: Collection[str],
    shards: Collection[ShardSpec] = (),
    throughput: float = 0.0,
    load: float = 0.0,
    software: str = "",
    protocols: Collection[str] = (),
    ttl_ms: int = 120_000,
    issued_at_ms: int,
    tee: str = "none",
    tee_attestation: bytes = b"",
) -> CapabilityRecord:
    issued = issued_at_ms
    return CapabilityRecord(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        addrs=tuple(addrs),
        shards=tuple(shards),
        throughput=throughput,
        load=load,
        tee=tee,
        tee_attestation=tee_attestation,
        software=software,
        protocols=tuple(protocols),
        issued_at_ms=issued,
        expires_at_ms=issued + ttl_ms,
        schema=SCHEMA_VERSION if tee == "none" else TEE_SCHEMA_VERSION,
    )


def verify_record(
    envelope: bytes,
    *,
    now: int,
    known_models: Collection[str] | None = None,
    expected_peer_id: str | None = None,
) -> CapabilityRecord:
    """Parse and check a record envelope; raise :class:`RecordError` saying why it fails.

    Checks, in order: size, envelope shape, signature over the body, body schema, the
    public key's binding to the peer id, the identity puzzle, the time window, and (when
    given) that every shard names a known model and that the record is the expected peer's.
    The record returned keeps ``envelope``.
    """
    record = verify_record_static(envelope, expected_peer_id=expected_peer_id)
    _check_times(record, now)
    if known_models is not None:
        unknown = sorted({s.model_id for s in record.shards} - set(known_models))
        if unknown:
            raise RecordError(f"record of {record.peer_id} names unknown model(s) {unknown}")
    return record


def verify_record_static(envelope: bytes, *, expected_peer_id: str | None = None) -> CapabilityRecord:
    """Every check of :func:`verify_record` that does not depend on the time (size, shape,
    signature, schema, key binding, puzzle, expected peer, lifetime): same bytes, same
    verdict, so a verifier may remember it; :func:`check_record_times` is the rest."""
    if len(envelope) > MAX_RECORD_BYTES:
        raise RecordError(f"record is {len(envelope)} bytes, limit {MAX_RECORD_BYTES}")
    body, signature = _open_envelope(envelope)
    record = _parse_body(body)
    if not verify_signature(record.public_key, SIGNING_DOMAIN + body, signature):
        raise RecordError(f"bad signature on record of {record.peer_id}")
    if peer_id_from_public_key(record.public_key) != record.peer_id:
        raise RecordError(f"public key does not match peer id {record.peer_id}")
    if not solves_puzzle(record.public_key):
        raise RecordError(f"identity {record.peer_id} does not solve the identity puzzle ({PUZZLE_DIFFICULTY} leading zero bits)")
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        raise RecordError(f"record is for {record.peer_id}, expected {expected_peer_id}")
    if record.expires_at_ms <= record.issued_at_ms:
        raise RecordError(f"record of {record.peer_id} expires before it is issued")
    if record.expires_at_ms - record.issued_at_ms > MAX_LIFETIME_MS:
        raise RecordError(f"record of {record.peer_id} lives longer than {MAX_LIFETIME_MS} ms")
    return replace(record, envelope=envelope)


def check_record_times(record: CapabilityRecord, now: int) -> None:
    """The time window of a record that passed :func:`verify_record_static`."""
    _check_times(record, now)


def _open_envelope(envelope: bytes) -> tuple[bytes, bytes]:
    try:
        outer = msgpack.unpackb(envelope, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError(f"record is not msgpack: {exc}") from None
    if not (isinstance(outer, list) and len(outer) == 3):
        raise RecordError("record envelope must be [version, body, signature]")
    version, body, signature = outer
    if version != ENVELOPE_VERSION:
        raise RecordError(f"unsupported record envelope version {version!r}")
    if not (isinstance(body, bytes) and isinstance(signature, bytes) and len(signature) == 64):
        raise RecordError("record envelope needs a bytes body and a 64-byte signature")
    return body, signature


def _parse_body(body: bytes) -> CapabilityRecord:
    try:
        fields = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise RecordError(f"record body is not msgpack: {exc}") from None
    if not isinstance(fields, list) or len(fields) != 13:
        raise RecordError("record body must be an array of 13 fields")
    schema, peer_id, public_key, addrs, shards, throughput, load, tee, att, software, protocols, issued, expires = fields
    _expect(schema in READABLE_SCHEMAS, f"unsupported record schema {schema!r}")
    _expect(isinstance(peer_id, str) and 0 < len(peer_id) <= 128, "peer_id must be a string")
    _expect(isinstance(public_key, bytes) and len(public_key) == 32, "public_key must be 32 bytes")
    _expect(_is_str_list(addrs, 16), "addrs must be a list of at most 16 strings")
    _expect(isinstance(shards, list) and len(shards) <= 64, "shards must be a list of at most 64 entries")
    parsed_shards = tuple(_parse_shard(s) for s in shards)
    _expect(_is_finite_number(throughput) and throughput >= 0, "throughput must be a finite number >= 0")
    _expect(_is_finite_number(load) and load >= 0, "load must be a finite number >= 0")
    _expect(tee in TEE_KINDS, f"tee must be one of {TEE_KINDS}")
    _expect(isinstance(att, bytes) and len(att) <= MAX_ATTESTATION_BYTES, f"tee_attestation must be at most {MAX_ATTESTATION_BYTES} bytes")
    _expect((tee == "none") == (schema == SCHEMA_VERSION), f"schema {schema} record cannot have tee {tee!r} (tee records are schema 3)")
    _expect((tee == "none") == (att == b""), "tee_attestation must be empty exactly when tee is none")
    _expect(isinstance(software, str) and len(software) <= 64, "software must be a short string")
    _expect(_is_str_list(protocols, 32), "protocols must be a list of strings")
    _expect(isinstance(issued, int) and isinstance(expires, int), "issued/expires must be integers (ms)")
    return CapabilityRecord(
        peer_id=peer_id,
        public_key=public_key,
        addrs=tuple(addrs),
        shards=parsed_shards,
        throughput=float(throughput),
        load=float(load),
        tee=tee,
        tee_attestation=att,
        software=software,
        protocols=tuple(protocols),
        issued_at_ms=issued,
        expires_at_ms=expires,
        schema=schema,
    )


def _parse_shard(raw: object) -> ShardSpec:
    ok = (
        isinstance(raw, list)
        and len(raw) == 3
        and isinstance(raw[0], str)
        and 0 < len(raw[0]) <= 128
        and all(isinstance(v, int) for v in raw[1:])
    )
    _expect(ok, "each shard must be [model_id, first, last]")
    assert isinstance(raw, list)
    return ShardSpec(raw[0], raw[1], raw[2])


def _check_times(record: CapabilityRecord, now: int) -> None:
    if record.issued_at_ms > now + CLOCK_SKEW_MS:
        raise RecordError(f"record of {record.peer_id} is dated in the future")
    if record.is_expired(now):
        raise RecordError(f"record of {record.peer_id} expired {now - record.expires_at_ms} ms ago")


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise RecordError(reason)


def _is_str_list(value: object, limit: int) -> bool:
    return isinstance(value, list) and len(value) <= limit and all(isinstance(v, str) and len(v) <= 256 for v in value)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def newest(envelopes: list[bytes]) -> int:
    """Index of the newest valid-looking record (DHT ``select``); invalid ones lose."""
    best, best_issued = 0, -1
    for i, env in enumerate(envelopes):
        try:
            issued = _parse_body(_open_envelope(env)[0]).issued_at_ms
        except RecordError:
            continue
        if issued > best_issued:
            best, best_issued = i, issued
    return best


# ---- DHT key layout (protocols/records.md) ----


def record_key(peer_id: str) -> str:
    """DHT value key holding a peer's record."""
    return f"/{KEY_NAMESPACE}/peer/{peer_id}"


def _provider_key(name: str) -> str:
    # Always a sha256 hex digest: py-libp2p hex-decodes provider keys that look like hex,
    # so a plain name could change meaning (notes/libp2p.md, bug 13).
    return hashlib.sha256(name.encode()).hexdigest()


def all_peers_key() -> str:
    """Provider key every serving peer announces: the overlay's member list."""
    return _provider_key(f"{KEY_NAMESPACE}/peers/v1")


def model_key(model_id: str) -> str:
    """Provider key of everyone serving some layers of ``model_id``."""
    return _provider_key(f"{KEY_NAMESPACE}/model/v1/{model_id}")


def shard_key(shard: ShardSpec) -> str:
    """Provider key of one exact shard (model id + layer range)."""
    return _provider_key(f"{KEY_NAMESPACE}/shard/v1/{shard.model_id}/{shard.first}-{shard.last}")
