"""Attestation: the real DCAP verifier on genuine Intel quotes, and the simulated backend."""

import json
from pathlib import Path

import msgpack
import pytest

from p2p_infer.errors import AttestationBinding, AttestationStale, MeasurementRefused, TeeError, TeeUnavailable
from p2p_infer.identity import Identity
from p2p_infer.verify import tee

DATA = Path("/work/shared/testdata/tdx")
AT_MS = 1_751_000_000_000  # inside the collateral's window (README there)
EXPIRED_MS = 1_900_000_000_000
SHARDS = [("m" * 64, 1, 3, ["a" * 64, "b" * 64, "c" * 64])]
NOW = 1_764_000_000_000

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/testdata/tdx not present")


def _evidence(name: str) -> tuple[bytes, str]:
    return (DATA / f"{name}_quote").read_bytes(), (DATA / f"{name}_quote_collateral.json").read_text()


def _quote_envelope(name: str, quote: bytes, issued: int) -> bytes:
    return tee.encode_attestation(name, quote, issued, tee.code_hash())


@needs_data
def test_genuine_tdx_quote_verifies_at_the_fixed_time():
    quote, collateral = _evidence("tdx")
    report = tee.dcap_report(quote, collateral, AT_MS)
    assert report["status"] == "UpToDate"
    assert len(bytes.fromhex(report["report"]["TD10"]["report_data"])) == 64


@needs_data
def test_tampered_tdx_quote_fails():
    quote, collateral = _evidence("tdx")
    flipped = bytearray(quote)
    flipped[700] ^= 1
    with pytest.raises(TeeError, match="does not verify"):
        tee.dcap_report(bytes(flipped), collateral, AT_MS)


@needs_data
def test_tdx_quote_fails_once_its_collateral_expired():
    quote, collateral = _evidence("tdx")
    with pytest.raises(AttestationStale, match="Crl"):
        tee.dcap_report(quote, collateral, EXPIRED_MS)


@needs_data
@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_genuine_quote_is_refused_as_an_attestation_of_our_peer_key(kind):
    """The quote is real and verifies, but its report data binds its producer's key, not ours."""
    quote, collateral = _evidence(kind)
    report = tee.dcap_report(quote, collateral, AT_MS)
    inner = report["report"].get("TD10") or report["report"].get("SgxEnclave")
    platform = inner.get("mr_td") or inner["mr_enclave"]
    policy = tee.Policy(allowed_code=frozenset({tee.code_hash()}), allowed_platform=frozenset({platform}),
                        dcap_statuses=frozenset({report["status"]}), collateral={kind: collateral})
    blob = _quote_envelope(kind, quote, AT_MS)
    for _ in range(3):
        with pytest.raises(AttestationBinding, match="does not bind"):
            tee.verify_attestation(blob, kind=kind, public_key=Identity.generate().public_key, shard_hashes=SHARDS,
                                   policy=policy, now_ms=AT_MS)


@needs_data
def test_sgx_sample_status_is_refused_by_the_default_policy():
    """The SGX sample's platform needs configuration hardening: only UpToDate passes by default."""
    quote, collateral = _evidence("sgx")
    blob = _quote_envelope("sgx", quote, AT_MS)
    policy = tee.Policy.default(allowed_platform=["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"],
                                collateral={"sgx": collateral})
    with pytest.raises(MeasurementRefused, match="ConfigurationAndSWHardeningNeeded"):
        tee.verify_attestation(blob, kind="sgx", public_key=b"\0" * 32, shard_hashes=SHARDS, policy=policy, now_ms=AT_MS)


def test_sim_attestation_binds_key_code_and_shards():
    ident = Identity.generate()
    measured = tee.measurement(tee.code_hash(), SHARDS)
    blob = tee.SimAttester().attest(ident.public_key, measured, tee.code_hash(), NOW)
    policy = tee.Policy.default()
    attested = tee.verify_attestation(blob, kind="simulated", public_key=ident.public_key, shard_hashes=SHARDS, policy=policy, now_ms=NOW + 1000)
    assert attested.measurement == measured and attested.fresh(NOW + 1000)
    with pytest.raises(AttestationBinding):  # another peer's key
        tee.verify_attestation(blob, kind="simulated", public_key=Identity.generate().public_key, shard_hashes=SHARDS, policy=policy, now_ms=NOW)
    with pytest.raises(AttestationBinding):  # other layers than it measured
        tee.verify_attestation(blob, kind="simulated", public_key=ident.public_key, shard_hashes=[("m" * 64, 1, 2, ["a" * 64, "b" * 64])],
                               policy=policy, now_ms=NOW)
    with pytest.raises(AttestationStale):
        tee.verify_attestation(blob, kind="simulated", public_key=ident.public_key, shard_hashes=SHARDS, policy=policy,
                               now_ms=NOW + tee.DEFAULT_MAX_AGE_MS + 1)
    with pytest.raises(TeeError, match="record says"):
        tee.verify_attestation(blob, kind="tdx", public_key=ident.public_key, shard_hashes=SHARDS, policy=policy, now_ms=NOW)


def test_sim_attestation_from_another_root_or_code_is_refused():
    ident = Identity.generate()
    measured = tee.measurement(tee.code_hash(), SHARDS)
    forged = tee.SimAttester(root_seed=b"\x07" * 32).attest(ident.public_key, measured, tee.code_hash(), NOW)
    with pytest.raises(TeeError, match="not signed by the simulated enclave root"):
        tee.verify_attestation(forged, kind="simulated", public_key=ident.public_key, shard_hashes=SHARDS, policy=tee.Policy.default(), now_ms=NOW)
    other_code = b"\x01" * 32
    blob = tee.SimAttester().attest(ident.public_key, tee.measurement(other_code, SHARDS), other_code, NOW)
    with pytest.raises(MeasurementRefused, match="allow-list"):
        tee.verify_attestation(blob, kind="simulated", public_key=ident.public_key, shard_hashes=SHARDS, policy=tee.Policy.default(), now_ms=NOW)
    allowed = tee.Policy.default(extra_code=[other_code])
    assert tee.verify_attestation(blob, kind="simulated", public_key=ident.public_key, shard_hashes=SHARDS, policy=allowed, now_ms=NOW)


def test_tdx_and_sgx_attesters_refuse_without_quote_source(tmp_path):
    if not tee.TSM_REPORT_DIR.is_dir():
        with pytest.raises(TeeUnavailable, match="cannot produce a quote here"):
            tee.make_attester("tdx")
    with pytest.raises(TeeUnavailable, match="cannot produce a quote here"):
        tee.make_attester("sgx")
    quote = tmp_path / "q"
    quote.write_bytes(b"not a quote")
    blob = tee.make_attester("tdx", quote_file=quote).attest(b"\0" * 32, b"\0" * 32, tee.code_hash(), NOW)
    with pytest.raises(TeeError, match="no tdx collateral"):
        tee.verify_attestation(blob, kind="tdx", public_key=b"\0" * 32, shard_hashes=SHARDS, policy=tee.Policy.default(), now_ms=NOW)
    with pytest.raises(TeeError, match="does not verify"):
        tee.verify_attestation(blob, kind="tdx", public_key=b"\0" * 32, shard_hashes=SHARDS, now_ms=NOW,
                               policy=tee.Policy.default(collateral={"tdx": _evidence("tdx")[1]}))
    with pytest.raises(TeeUnavailable, match="unknown --tee"):
        tee.make_attester("sev")
    assert tee.make_attester("none") is None


def test_malformed_envelopes_are_refused():
    for blob in (b"", b"\xc1", msgpack.packb([2, "simulated", b"", 0, b"\0" * 32]), msgpack.packb([1, "simulated", b"", 0, b"short"])):
        with pytest.raises(TeeError):
            tee.verify_attestation(blob, kind="simulated", public_key=b"\0" * 32, shard_hashes=SHARDS, policy=tee.Policy.default(), now_ms=NOW)


def test_record_v3_vector_matches_code_and_verifies():
    from p2p_infer.proto.records import ShardSpec, make_record, sign_record, verify_record

    v3 = json.loads((Path(__file__).parent.parent / "protocols" / "test-vectors" / "record-v3.json").read_text())
    ident = Identity.from_seed(bytes.fromhex(v3["identity"]["seed_hex"]))
    code = bytes.fromhex(v3["code_hash_hex"])
    f = v3["record"]
    shards = [(f["shards"][0][0], 1, 2, v3["layer_hashes"])]
    measured = tee.measurement(code, shards)
    assert measured.hex() == v3["measurement_hex"]
    assert tee.report_data(ident.public_key, measured).hex() == v3["report_data_hex"]
    assert tee.sim_root_public_key().hex() == v3["sim_root_public_key_hex"]
    attestation = tee.SimAttester().attest(ident.public_key, measured, code, f["issued_at_ms"])
    assert attestation.hex() == v3["attestation_hex"]
    rec = make_record(ident, addrs=f["addrs"], shards=[ShardSpec(*s) for s in f["shards"]], throughput=f["throughput"], load=f["load"],
                      software=f["software"], protocols=f["protocols"], ttl_ms=f["ttl_ms"], issued_at_ms=f["issued_at_ms"],
                      tee="simulated", tee_attestation=attestation)
    assert rec.schema == 3 and sign_record(rec, ident).hex() == v3["envelope_hex"]
    read = verify_record(bytes.fromhex(v3["envelope_hex"]), now=v3["verify_at_ms"])
    policy = tee.Policy(allowed_code=frozenset({code}))
    assert tee.verify_attestation(read.tee_attestation, kind=read.tee, public_key=read.public_key, shard_hashes=shards,
                                  policy=policy, now_ms=v3["verify_at_ms"]).measurement == measured


def test_schema_and_tee_fields_must_agree():
    from dataclasses import replace

    from p2p_infer.errors import RecordError
    from p2p_infer.proto.records import ShardSpec, make_record, sign_record, verify_record

    ident = Identity.generate()
    base = make_record(ident, addrs=[], shards=[ShardSpec("m" * 64, 1, 1)], issued_at_ms=NOW)
    assert base.schema == 2
    for bad, why in ((replace(base, tee="simulated", tee_attestation=b"x"), "schema 2 record cannot have tee"),
                     (replace(base, schema=3, tee="simulated"), "empty exactly when tee is none"),
                     (replace(base, schema=3), "schema 3 record cannot have tee 'none'"),
                     (replace(base, schema=3, tee="tdx", tee_attestation=b"x" * 13_000), "at most")):
        with pytest.raises(RecordError, match=why):
            verify_record(sign_record(bad, ident), now=NOW)


def test_tee_is_a_constraint_on_any_check_and_threshold_implies_it():
    from p2p_infer.errors import UnsupportedMode
    from p2p_infer.proto.plan import QueryPlan

    committee = QueryPlan.from_options(committee=3, require_tee=True).validate()
    assert committee.check == "committee" and committee.require_tee  # TEE-only committees
    assert QueryPlan.from_options(critical=True, require_tee=True).validate().check == "zk"
    default = QueryPlan.from_options(require_tee=True).validate()
    assert default.check == "committee" and default.committee_k == 3 and default.require_tee  # verified by default, TEE-only
    with pytest.raises(UnsupportedMode, match="threshold with committee.*--unverified"):
        QueryPlan.from_options(enhanced_privacy=True).validate()
    private = QueryPlan.from_options(enhanced_privacy=True, unverified=True).validate()
    assert private.require_tee and private.check == "none" and private.describe() == "direct+none+threshold"


def test_require_tee_routes_only_through_attested_servers_and_names_the_stage():
    from p2p_infer.errors import NoRoute
    from p2p_infer.proto.routing import Server, plan_route

    servers = [Server("fast-plain", 1, 3, 1000.0), Server("tee-a", 1, 2, 10.0, attested=True), Server("tee-b", 3, 3, 10.0, attested=True)]
    assert [s.peer_id for s in plan_route(servers, 1, 3)] == ["fast-plain"]
    assert [s.peer_id for s in plan_route(servers, 1, 3, require_tee=True)] == ["tee-a", "tee-b"]
    with pytest.raises(NoRoute, match=r"--require-tee: no attested peer serves layer 3 .*0 attested provider\(s\); 2 attested"):
        plan_route(servers, 1, 3, require_tee=True, exclude=["tee-b"])


@needs_data
def test_reader_policy_from_settings_takes_collateral_and_platform_allow_list():
    from p2p_infer.config import Settings

    mr_td = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    settings = Settings(tee_collateral=[f"tdx={DATA / 'tdx_quote_collateral.json'}"], tee_allow_platform=[mr_td.upper()], tee_max_age=60)
    policy = tee.policy_from_settings(settings)
    assert policy.max_age_ms == 60_000 and mr_td in policy.allowed_platform
    blob = _quote_envelope("tdx", _evidence("tdx")[0], AT_MS)
    with pytest.raises(AttestationBinding):  # collateral found, quote verified, platform allowed: only the binding fails
        tee.verify_attestation(blob, kind="tdx", public_key=Identity.generate().public_key, shard_hashes=SHARDS, policy=policy, now_ms=AT_MS)
    for bad in (Settings(tee_collateral=["sev=x"]), Settings(tee_allow_code=["zz"])):
        with pytest.raises(TeeUnavailable):
            tee.policy_from_settings(bad)
