"""TEE attestation: attesters that bind a peer's key and measurement, verifiers per TEE kind.

A capability record's ``tee_attestation`` is an attestation envelope (``protocols/tee.md``)::

    msgpack [1, kind, evidence, issued_at_ms, code_hash]

Every kind binds the same 64 bytes of report data:
``SHA-256(BIND_DOMAIN || ed25519_public_key) || measurement``, where the measurement is a
SHA-256 over the code hash and the manifest hashes of the served layers. A verifier
recomputes both halves from the record (its key, its shards, the manifests it knows) and
the allow-list of code hashes, so an attestation cannot be moved to another key, other
layers or other code.

Backends:

- ``simulated``: evidence is a report signed by a *simulated enclave root* whose seed is
  published in this file. It protects nothing: anyone can sign with it. It exists so CI
  and demos run the same verification path that real quotes take.
- ``tdx`` / ``sgx``: evidence is an Intel DCAP quote, verified by ``dcap-qvl`` against
  collateral the *reader* holds (TCB info, QE identity, CRLs from Intel PCS or a PCCS
  cache: too large for a record, and not the peer's to supply) at the reader's clock
  (certificate chain to Intel's root, CRLs, TCB status, QE identity); then the quote's ``report_data`` must carry the binding above and its
  platform measurement (``mr_td`` / ``mr_enclave``) must be on the policy's allow-list.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing

from ..errors import AttestationBinding, AttestationStale, MeasurementRefused, TeeError, TeeUnavailable
from ..identity import verify_signature

ENVELOPE_VERSION = 1
BIND_DOMAIN = b"p2p-infer/tee-bind/v1\n"
MEASURE_DOMAIN = b"p2p-infer/tee-measurement/v1\n"
SIM_DOMAIN = b"p2p-infer/sim-enclave-report/v1\n"
# Published on purpose: the simulated root is a stand-in, and its signatures prove nothing.
SIM_ROOT_SEED = hashlib.sha256(b"p2p-infer simulated enclave root v1: protects nothing").digest()
FLAG_KINDS = {"sim": "simulated", "tdx": "tdx", "sgx": "sgx"}
DEFAULT_MAX_AGE_MS = 600_000  # an attestation older than this is stale (peers re-attest each publish)
CLOCK_SKEW_MS = 30_000
GOOD_DCAP_STATUSES = frozenset({"UpToDate"})
TSM_REPORT_DIR = Path("/sys/kernel/config/tsm/report")  # Linux configfs-tsm: quotes inside a TDX guest


def sim_root_public_key(seed: bytes = SIM_ROOT_SEED) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


@lru_cache(maxsize=1)
def code_hash() -> bytes:
    """SHA-256 over this package's Python sources (relative path, NUL, bytes; sorted): the code measured."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


def measurement(code: bytes, shard_hashes: Sequence[tuple[str, int, int, Sequence[str]]]) -> bytes:
    """What an attestation measures: the code and each served shard (model id, range, layer hashes)."""
    shards = sorted([model_id, first, last, list(hashes)] for model_id, first, last, hashes in shard_hashes)
    return hashlib.sha256(MEASURE_DOMAIN + code + msgpack.packb(shards, use_bin_type=True)).digest()


def report_data(public_key: bytes, measured: bytes) -> bytes:
    """The 64 bytes a TEE report carries: the peer key's hash, then the measurement."""
    return hashlib.sha256(BIND_DOMAIN + public_key).digest() + measured


@dataclass(frozen=True)
class Attested:
    """What a verified attestation establishes."""

    kind: str
    public_key: bytes
    measurement: bytes
    code_hash: bytes
    issued_at_ms: int
    valid_until_ms: int
    platform: Mapping[str, str] = field(default_factory=dict)  # mr_td / mr_enclave / status, for the record

    def fresh(self, now_ms: int) -> bool:
        return now_ms < self.valid_until_ms

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "measurement": self.measurement.hex(), "code_hash": self.code_hash.hex(),
                "issued_at_ms": self.issued_at_ms, "valid_until_ms": self.valid_until_ms, **self.platform}


@dataclass(frozen=True)
class Policy:
    """The allow-list: code hashes (all kinds), platform measurements (real kinds), accepted kinds."""

    allowed_code: frozenset[bytes]
    allowed_platform: frozenset[str] = frozenset()  # hex mr_td (tdx) / mr_enclave (sgx); empty: none allowed
    kinds: frozenset[str] = frozenset({"simulated", "tdx", "sgx"})
    max_age_ms: int = DEFAULT_MAX_AGE_MS
    sim_root: bytes = field(default_factory=sim_root_public_key)
    dcap_statuses: frozenset[str] = GOOD_DCAP_STATUSES
    collateral: Mapping[str, str] = field(default_factory=dict)  # kind -> collateral JSON the reader trusts

    @classmethod
    def default(cls, extra_code: Collection[bytes] = (), allowed_platform: Collection[str] = (),
                collateral: Mapping[str, str] | None = None, max_age_ms: int = DEFAULT_MAX_AGE_MS) -> Policy:
        """Our own code (and any extra hashes an operator allows), no real platform unless listed."""
        return cls(allowed_code=frozenset({code_hash(), *extra_code}), allowed_platform=frozenset(allowed_platform),
                   collateral=dict(collateral or {}), max_age_ms=max_age_ms)


def policy_from_settings(settings: Any) -> Policy:
    """The reader policy the ``tee_*`` settings ask for (config file or P2P_INFER_TEE_* variables)."""
    collateral = {}
    for entry in settings.tee_collateral:
        kind, sep, path = entry.partition("=")
        if not sep or kind not in ("tdx", "sgx"):
            raise TeeUnavailable(f"tee_collateral entry {entry!r} must be tdx=FILE or sgx=FILE")
        collateral[kind] = Path(path).read_text()
    try:
        extra = [bytes.fromhex(h) for h in settings.tee_allow_code]
    except ValueError:
        raise TeeUnavailable(f"tee_allow_code must be hex code hashes, got {settings.tee_allow_code}") from None
    return Policy.default(extra_code=extra, allowed_platform=[p.lower() for p in settings.tee_allow_platform],
                          collateral=collateral, max_age_ms=int(settings.tee_max_age * 1000))


# ---- envelopes ----


def encode_attestation(kind: str, evidence: bytes, issued_at_ms: int, code: bytes) -> bytes:
    return msgpack.packb([ENVELOPE_VERSION, kind, evidence, issued_at_ms, code], use_bin_type=True)


def decode_attestation(blob: bytes) -> tuple[str, bytes, int, bytes]:
    try:
        fields = msgpack.unpackb(blob, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise TeeError(f"attestation is not msgpack: {exc}") from None
    ok = (isinstance(fields, list) and len(fields) == 5 and fields[0] == ENVELOPE_VERSION and isinstance(fields[1], str)
          and isinstance(fields[2], bytes) and isinstance(fields[3], int) and isinstance(fields[4], bytes) and len(fields[4]) == 32)
    if not ok:
        raise TeeError("attestation must be [1, kind, evidence: bin, issued_at_ms: int, code_hash: bin(32)]")
    return fields[1], fields[2], fields[3], fields[4]


# ---- attesters ----


class SimAttester:
    """A simulated enclave: signs report data with the published sim root. Protects nothing."""

    kind = "simulated"

    def __init__(self, root_seed: bytes = SIM_ROOT_SEED) -> None:
        self._root = nacl.signing.SigningKey(root_seed)

    def attest(self, public_key: bytes, measured: bytes, code: bytes, now_ms: int) -> bytes:
        body = msgpack.packb([report_data(public_key, measured), now_ms], use_bin_type=True)
        evidence = msgpack.packb([body, self._root.sign(SIM_DOMAIN + body).signature], use_bin_type=True)
        return encode_attestation(self.kind, evidence, now_ms, code)


class QuoteAttester:
    """tdx/sgx: a DCAP quote, from configfs-tsm inside a TDX guest or from a file."""

    def __init__(self, kind: str, quote_file: Path | None) -> None:
        self.kind = kind
        if quote_file is None and not (kind == "tdx" and TSM_REPORT_DIR.is_dir()):
            raise TeeUnavailable(f"--tee {kind} cannot produce a quote here: no TDX guest quote interface "
                                 f"({TSM_REPORT_DIR} is missing) and no --tee-quote FILE given")
        self.quote_file = quote_file

    def attest(self, public_key: bytes, measured: bytes, code: bytes, now_ms: int) -> bytes:
        data = report_data(public_key, measured)
        quote = self.quote_file.read_bytes() if self.quote_file is not None else _tsm_quote(data)
        return encode_attestation(self.kind, quote, now_ms, code)


def _tsm_quote(data: bytes) -> bytes:
    """A TDX quote over ``data`` from Linux configfs-tsm (untested here: no TDX guest in CI)."""
    entry = TSM_REPORT_DIR / f"p2p-infer-{data[:4].hex()}"
    entry.mkdir(exist_ok=True)
    try:
        (entry / "inblob").write_bytes(data)
        return (entry / "outblob").read_bytes()
    finally:
        entry.rmdir()


def make_attester(flag: str, quote_file: Path | None = None) -> SimAttester | QuoteAttester | None:
    """The attester ``--tee FLAG`` asks for (None for ``none``); refuses what cannot be honoured."""
    if flag in ("", "none"):
        return None
    if flag not in FLAG_KINDS:
        raise TeeUnavailable(f"unknown --tee {flag!r} (known: none, {', '.join(FLAG_KINDS)})")
    if flag == "sim":
        return SimAttester()
    return QuoteAttester(FLAG_KINDS[flag], quote_file)


# ---- verifiers ----


def verify_attestation(blob: bytes, *, kind: str, public_key: bytes, shard_hashes: Sequence[tuple[str, int, int, Sequence[str]]],
                       policy: Policy, now_ms: int) -> Attested:
    """Check an attestation envelope against a record's key, shards and the policy; raise TeeError saying why."""
    claimed_kind, evidence, issued, code = decode_attestation(blob)
    if claimed_kind != kind:
        raise TeeError(f"attestation is {claimed_kind!r}, record says tee {kind!r}")
    if kind not in policy.kinds:
        raise MeasurementRefused(f"TEE kind {kind!r} is not accepted by this policy")
    if issued > now_ms + CLOCK_SKEW_MS or now_ms - issued > policy.max_age_ms:
        raise AttestationStale(f"attestation issued {now_ms - issued} ms ago (max age {policy.max_age_ms} ms)")
    if code not in policy.allowed_code:
        raise MeasurementRefused(f"code hash {code.hex()[:16]} is not on the allow-list")
    measured = measurement(code, shard_hashes)
    expected = report_data(public_key, measured)
    if kind == "simulated":
        platform = _verify_sim(evidence, expected, issued, policy)
    elif kind in ("tdx", "sgx"):
        platform = verify_dcap(evidence, kind, expected, policy, now_ms)
    else:
        raise TeeError(f"no verifier for TEE kind {kind!r}")
    return Attested(kind, public_key, measured, code, issued, issued + policy.max_age_ms, platform)


def _verify_sim(evidence: bytes, expected: bytes, issued: int, policy: Policy) -> dict[str, str]:
    try:
        body, signature = msgpack.unpackb(evidence, raw=False)
        data, at = msgpack.unpackb(body, raw=False)
    except Exception:
        raise TeeError("simulated report must be [body, signature], body [report_data, issued_at_ms]") from None
    if not (isinstance(signature, bytes) and verify_signature(policy.sim_root, SIM_DOMAIN + body, signature)):
        raise TeeError("simulated report is not signed by the simulated enclave root")
    if at != issued:
        raise TeeError("simulated report time differs from the envelope's")
    if data != expected:
        raise AttestationBinding("simulated report data does not bind this peer key and measurement")
    return {"root": policy.sim_root.hex()[:16]}


def verify_dcap(evidence: bytes, kind: str, expected: bytes, policy: Policy, now_ms: int) -> dict[str, str]:
    """A DCAP quote checked by dcap-qvl at ``now_ms``, then its binding and platform measurement."""
    collateral = policy.collateral.get(kind)
    if collateral is None:
        raise TeeError(f"no {kind} collateral configured on this reader (tee_collateral): a {kind} quote cannot be checked")
    report = dcap_report(evidence, collateral, now_ms)
    status = report["status"]
    if status not in policy.dcap_statuses:
        raise MeasurementRefused(f"{kind} TCB status {status} (advisories {report.get('advisory_ids')}) is not accepted")
    body = report["report"]
    inner = body.get("TD10") or body.get("TD15") if kind == "tdx" else body.get("SgxEnclave")
    if inner is None:
        raise TeeError(f"quote is not a {kind} quote (report {sorted(body)})")
    if bytes.fromhex(inner["report_data"]) != expected:
        raise AttestationBinding(f"{kind} quote's report data does not bind this peer key and measurement")
    platform = inner["mr_td"] if kind == "tdx" else inner["mr_enclave"]
    if platform not in policy.allowed_platform:
        raise MeasurementRefused(f"{kind} platform measurement {platform[:16]}... is not on the allow-list")
    return {"status": status, "platform_measurement": platform}


def dcap_report(quote: bytes, collateral_json: str, now_ms: int) -> dict[str, Any]:
    """dcap-qvl's verdict on a quote at ``now_ms`` (signature chain, CRLs, TCB, QE identity); TeeError if it fails."""
    import dcap_qvl  # a compiled verifier; only readers of real quotes load it

    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
        verified = dcap_qvl.verify(quote, collateral, now_ms // 1000)
    except ValueError as exc:
        message = str(exc)
        stale = "Expired" in message or "expired" in message
        raise (AttestationStale if stale else TeeError)(f"DCAP quote does not verify: {message}") from None
    result: dict[str, Any] = json.loads(verified.to_json())
    return result


# ---- records ----


def shard_hashes(shards: Sequence[Any], manifests: Mapping[str, Any]) -> list[tuple[str, int, int, list[str]]]:
    """(model id, first, last, layer hashes) of each shard, from the manifests the caller trusts."""
    out = []
    for shard in shards:
        manifest = manifests.get(shard.model_id)
        if manifest is None or shard.last >= len(manifest.layer_hashes):
            raise MeasurementRefused(f"shard {shard} is not in a known manifest: its layers cannot be measured")
        out.append((shard.model_id, shard.first, shard.last, list(manifest.layer_hashes[shard.first:shard.last + 1])))
    return out


TEST_FAULTS = ("tee-forged", "tee-stale", "tee-measurement")  # testing aids: attestations readers must ignore


def attest_record_fields(attester: SimAttester | QuoteAttester, public_key: bytes, shards: Sequence[Any],
                         manifests: Mapping[str, Any], now_ms: int, fault: str = "") -> tuple[str, bytes]:
    """(tee kind, attestation) for a record of ``public_key`` serving ``shards`` (``fault``: a test's bad one)."""
    code = code_hash()
    hashes = shard_hashes(shards, manifests)
    if fault == "tee-forged":
        attester = SimAttester(root_seed=hashlib.sha256(b"not the simulated root").digest())
    elif fault == "tee-stale":
        now_ms -= 2 * DEFAULT_MAX_AGE_MS
    elif fault == "tee-measurement":
        hashes = [(m, first, last, ["0" * 64] * len(h)) for m, first, last, h in hashes]  # other weights than served
    return attester.kind, attester.attest(public_key, measurement(code, hashes), code, now_ms)


def check_record(record: Any, manifests: Mapping[str, Any], policy: Policy, now_ms: int) -> Attested:
    """Verify a capability record's attestation against its own key and shards; TeeError says why not."""
    if record.tee == "none" or not record.tee_attestation:
        raise TeeError(f"record of {record.peer_id} carries no attestation")
    return verify_attestation(record.tee_attestation, kind=record.tee, public_key=record.public_key,
                              shard_hashes=shard_hashes(record.shards, manifests), policy=policy, now_ms=now_ms)
