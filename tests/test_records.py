import json
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from p2p_infer.errors import RecordError
from p2p_infer.identity import Identity
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


def test_vector_matches_code_byte_for_byte():
    ident = Identity.from_seed(bytes.fromhex(VECTOR["seed_hex"]))
    assert ident.public_key.hex() == VECTOR["public_key_hex"]
    assert ident.peer_id == VECTOR["peer_id"]
    r = VECTOR["record"]
    rec = CapabilityRecord(
        peer_id=r["peer_id"], public_key=ident.public_key, addrs=tuple(r["addrs"]),
        shards=tuple(ShardSpec(*s) for s in r["shards"]), throughput=r["throughput"], load=r["load"], tee=r["tee"],
        tee_attestation=bytes.fromhex(r["tee_attestation_hex"]), software=r["software"], protocols=tuple(r["protocols"]),
        issued_at_ms=r["issued_at_ms"], expires_at_ms=r["expires_at_ms"],
    )
    assert encode_body(rec).hex() == VECTOR["body_hex"]
    assert (SIGNING_DOMAIN + encode_body(rec)).hex() == VECTOR["signed_bytes_hex"]
    assert sign_record(rec, ident).hex() == VECTOR["envelope_hex"]
    assert ident.sign(bytes.fromhex(VECTOR["signed_bytes_hex"])).hex() == VECTOR["signature_hex"]
    assert verify_record(bytes.fromhex(VECTOR["envelope_hex"]), now=VECTOR["verify_at_ms"]) == rec
    assert record_key(ident.peer_id) == VECTOR["dht_value_key"]
    keys = VECTOR["provider_keys"]
    assert (all_peers_key(), model_key(MODEL), shard_key(rec.shards[0])) == (keys["all_peers"], keys["model"], keys["shard"])


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
