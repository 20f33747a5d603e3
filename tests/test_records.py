import json
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from p2p_infer.errors import RecordError
from p2p_infer.identity import Identity, puzzle_hash
from p2p_infer.proto.records import (
    MAX_RECORD_BYTES,
    SIGNING_DOMAIN,
    CapabilityRecord,
    ShardSpec,
    all_peers_key,
    encode_body,
    make_record,
    model_key,
    newest,
    record_key,
    shard_key,
    sign_record,
    verify_record,
)

VECTOR = json.loads((Path(__file__).parent.parent / "protocols" / "test-vectors" / "record.json").read_text())
MODEL = "f4824c9e60a9654844afb72cd9c0c8e6a9b3739e3f0e11ba507f61518d428823"
NOW = 1_764_000_000_000


def _record(ident: Identity, **kw) -> CapabilityRecord:
    return make_record(ident, addrs=["/ip4/127.0.0.1/tcp/1"], shards=[ShardSpec(MODEL, 0, 2)], throughput=10.0,
                       issued_at_ms=kw.pop("issued_at_ms", NOW), ttl_ms=kw.pop("ttl_ms", 60_000), **kw)


def test_v1_vector_still_encodes_byte_for_byte_and_is_refused():
    """record.json is schema 1: its bytes still come out of the encoder, but schema 1 (keys
    that need not solve the identity puzzle, and this one does not) is no longer accepted."""
    ident = Identity.from_seed(bytes.fromhex(VECTOR["seed_hex"]))
    assert ident.public_key.hex() == VECTOR["public_key_hex"]
    assert ident.peer_id == VECTOR["peer_id"]
    r = VECTOR["record"]
    rec = CapabilityRecord(
        peer_id=r["peer_id"], public_key=ident.public_key, addrs=tuple(r["addrs"]),
        shards=tuple(ShardSpec(*s) for s in r["shards"]), throughput=r["throughput"], load=r["load"], tee=r["tee"],
        tee_attestation=bytes.fromhex(r["tee_attestation_hex"]), software=r["software"], protocols=tuple(r["protocols"]),
        issued_at_ms=r["issued_at_ms"], expires_at_ms=r["expires_at_ms"], schema=1,
    )
    assert encode_body(rec).hex() == VECTOR["body_hex"]
    assert (SIGNING_DOMAIN + encode_body(rec)).hex() == VECTOR["signed_bytes_hex"]
    assert sign_record(rec, ident).hex() == VECTOR["envelope_hex"]
    assert ident.sign(bytes.fromhex(VECTOR["signed_bytes_hex"])).hex() == VECTOR["signature_hex"]
    assert not ident.solves_puzzle
    with pytest.raises(RecordError, match="unsupported record schema 1"):
        verify_record(bytes.fromhex(VECTOR["envelope_hex"]), now=VECTOR["verify_at_ms"])
    assert record_key(ident.peer_id) == VECTOR["dht_value_key"]
    keys = VECTOR["provider_keys"]
    assert (all_peers_key(), model_key(MODEL), shard_key(rec.shards[0])) == (keys["all_peers"], keys["model"], keys["shard"])


def test_v2_vector_matches_code_byte_for_byte():
    v2 = json.loads((Path(__file__).parent.parent / "protocols" / "test-vectors" / "record-v2.json").read_text())
    ident = Identity.from_seed(bytes.fromhex(v2["identity"]["seed_hex"]))
    assert (ident.public_key.hex(), ident.peer_id) == (v2["identity"]["public_key_hex"], v2["identity"]["peer_id"])
    assert ident.solves_puzzle and puzzle_hash(ident.public_key).hex() == v2["identity"]["puzzle_hash_hex"]
    r = v2["record"]
    rec = make_record(ident, addrs=r["addrs"], shards=[ShardSpec(*s) for s in r["shards"]], throughput=r["throughput"], load=r["load"],
                      software=r["software"], protocols=r["protocols"], ttl_ms=r["ttl_ms"], issued_at_ms=r["issued_at_ms"])
    assert encode_body(rec).hex() == v2["body_hex"]
    assert (SIGNING_DOMAIN + encode_body(rec)).hex() == v2["signed_bytes_hex"]
    assert sign_record(rec, ident).hex() == v2["envelope_hex"]
    assert ident.sign(bytes.fromhex(v2["signed_bytes_hex"])).hex() == v2["signature_hex"]
    read = verify_record(bytes.fromhex(v2["envelope_hex"]), now=v2["verify_at_ms"])
    assert read == rec and read.envelope.hex() == v2["envelope_hex"]
    assert record_key(ident.peer_id) == v2["dht_value_key"]
    keys = v2["provider_keys"]
    assert (all_peers_key(), model_key(MODEL), shard_key(rec.shards[0])) == (keys["all_peers"], keys["model"], keys["shard"])


def test_a_key_that_does_not_solve_the_puzzle_is_refused():
    lazy = next(i for i in (Identity.from_seed(bytes([n]) * 32) for n in range(256)) if not i.solves_puzzle)
    with pytest.raises(RecordError, match="does not solve the identity puzzle"):
        verify_record(sign_record(_record(lazy), lazy), now=NOW)


def test_round_trip():
    ident = Identity.generate()
    rec = _record(ident)
    assert verify_record(sign_record(rec, ident), now=NOW + 1000, known_models={MODEL}) == rec


def test_wrong_signature_is_rejected():
    ident, other = Identity.generate(), Identity.generate()
    rec = _record(ident)
    body = encode_body(rec)
    forged = msgpack.packb([1, body, other.sign(SIGNING_DOMAIN + body)])
    with pytest.raises(RecordError, match="bad signature"):
        verify_record(forged, now=NOW)


def test_altered_body_is_rejected():
    ident = Identity.generate()
    _, body, sig = msgpack.unpackb(sign_record(_record(ident), ident))
    fields = msgpack.unpackb(body)
    fields[5] = 1e9  # inflate advertised throughput
    with pytest.raises(RecordError, match="bad signature"):
        verify_record(msgpack.packb([1, msgpack.packb(fields), sig]), now=NOW)


def test_key_not_matching_peer_id_is_rejected():
    ident, other = Identity.generate(), Identity.generate()
    rec = replace(_record(ident), peer_id=other.peer_id)  # claims another's id, signed with own key
    body = encode_body(rec)
    env = msgpack.packb([1, body, ident.sign(SIGNING_DOMAIN + body)])
    with pytest.raises(RecordError, match="does not match peer id"):
        verify_record(env, now=NOW)


def test_record_for_another_key_path_is_rejected():
    ident, other = Identity.generate(), Identity.generate()
    with pytest.raises(RecordError, match="expected"):
        verify_record(sign_record(_record(ident), ident), now=NOW, expected_peer_id=other.peer_id)


@pytest.mark.parametrize(
    "issued,ttl,now,reason",
    [
        (NOW, 60_000, NOW + 60_000, "expired"),
        (NOW + 120_000, 60_000, NOW, "future"),
        (NOW, 2 * 24 * 3600 * 1000, NOW, "longer than"),
    ],
)
def test_time_window(issued, ttl, now, reason):
    ident = Identity.generate()
    with pytest.raises(RecordError, match=reason):
        verify_record(sign_record(_record(ident, issued_at_ms=issued, ttl_ms=ttl), ident), now=now)


def test_unknown_model_is_rejected():
    ident = Identity.generate()
    with pytest.raises(RecordError, match="unknown model"):
        verify_record(sign_record(_record(ident), ident), now=NOW, known_models={"0" * 64})


@pytest.mark.parametrize(
    "envelope,reason",
    [
        (b"\xc1garbage", "not msgpack"),
        (msgpack.packb({"a": 1}), "envelope"),
        (msgpack.packb([2, b"x", b"y" * 64]), "version"),
        (msgpack.packb([1, b"x", b"short"]), "64-byte"),
        (msgpack.packb([1, msgpack.packb([1, 2, 3]), b"s" * 64]), "13 fields"),
        (b"\x00" * (MAX_RECORD_BYTES + 1), "limit"),
    ],
)
def test_malformed_envelopes(envelope, reason):
    with pytest.raises(RecordError, match=reason):
        verify_record(envelope, now=NOW)


def test_schema_errors_name_the_field():
    ident = Identity.generate()
    fields = msgpack.unpackb(encode_body(_record(ident)))
    fields[4] = [["m", 3, 1]]  # last < first
    body = msgpack.packb(fields)
    with pytest.raises(RecordError, match="layer range"):
        verify_record(msgpack.packb([1, body, ident.sign(SIGNING_DOMAIN + body)]), now=NOW)


def test_newest_prefers_latest_valid_record():
    ident = Identity.generate()
    old = sign_record(_record(ident, issued_at_ms=NOW), ident)
    new = sign_record(_record(ident, issued_at_ms=NOW + 5), ident)
    assert newest([old, new]) == 1
    assert newest([new, old]) == 0
    assert newest([b"junk", old]) == 1


def test_signing_someone_elses_record_is_refused():
    ident, other = Identity.generate(), Identity.generate()
    with pytest.raises(RecordError):
        sign_record(_record(ident), other)
