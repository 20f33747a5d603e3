"""Tests for ecvrf_edwards25519_sha512_tai (RFC 9381, ECVRF-EDWARDS25519-SHA512-TAI)."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import pytest
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_scalar_add,
    crypto_core_ed25519_scalar_mul,
)

from p2p_infer.proto import vrf

VECTORS_PATH = Path(__file__).parent.parent / "protocols" / "test-vectors" / "ecvrf_edwards25519_sha512_tai.json"
VECTORS: list[dict] = json.loads(VECTORS_PATH.read_text())["vectors"]

P = 2**255 - 19
Q = 2**252 + 27742317777372353535851937790883648493
IDENTITY = b"\x01" + bytes(31)
ORDER_2_POINT = bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")
ORDER_8_POINT = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")

# The eight small-order points, each in its canonical encoding.
SMALL_ORDER_POINTS = [
    IDENTITY,
    ORDER_2_POINT,
    bytes(32),  # (sqrt(-1), 0), order 4
    bytes(31) + b"\x80",  # (-sqrt(-1), 0), order 4
    ORDER_8_POINT,
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
]
# Non-canonical encodings (y >= p, or x = 0 with the sign bit set). A lax decoder maps
# all but the last of them to small-order points. RFC 8032 decoding rejects every one.
NON_CANONICAL_ENCODINGS = [
    (P + 1).to_bytes(32, "little"),  # y = 1 + p: the identity
    P.to_bytes(32, "little"),  # y = 0 + p: order 4
    (P | (1 << 255)).to_bytes(32, "little"),
    IDENTITY[:31] + b"\x80",  # identity with the sign bit set ("x = -0")
    ORDER_2_POINT[:31] + b"\xff",  # (0, -1) with the sign bit set
    (2**255 - 1).to_bytes(32, "little"),  # y = p + 18, with the sign bit clear
]


# --------------------------------------------------------------------------------------
# Independent reference arithmetic (affine twisted Edwards, slow). Used only as an oracle
# for the module's libsodium-based arithmetic.
# --------------------------------------------------------------------------------------

D = -121665 * pow(121666, -1, P) % P
RefPoint = tuple[int, int]


def ref_decode(encoded: bytes) -> RefPoint | None:
    y = int.from_bytes(encoded, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if x2 == 0:
        return None if sign else (0, y)
    if pow(x2, (P - 1) // 2, P) != 1:  # Euler's criterion
        return None
    x = pow(x2, (P + 3) // 8, P)
    if x * x % P != x2:
        x = x * pow(2, (P - 1) // 4, P) % P
    if x & 1 != sign:
        x = P - x
    return x, y


def ref_encode(point: RefPoint) -> bytes:
    x, y = point
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def ref_add(a: RefPoint, b: RefPoint) -> RefPoint:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return (
        (x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P,
        (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P,
    )


def ref_mul(k: int, point: RefPoint) -> RefPoint:
    result: RefPoint = (0, 1)
    while k:
        if k & 1:
            result = ref_add(result, point)
        point = ref_add(point, point)
        k >>= 1
    return result


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def vector_id(vector: dict) -> str:
    return vector["name"]


def flip_bit(data: bytes, bit_index: int) -> bytes:
    mutable = bytearray(data)
    mutable[bit_index // 8] ^= 1 << (bit_index % 8)
    return bytes(mutable)


def replace_s(pi: bytes, s: int) -> bytes:
    return pi[:48] + s.to_bytes(32, "little")


@pytest.fixture(scope="module")
def honest() -> tuple[bytes, bytes, bytes, bytes]:
    """(seed, public key, alpha, pi) for an honestly generated proof."""
    seed = hashlib.sha256(b"honest seed").digest()
    alpha = b"sample alpha"
    return seed, vrf.public_key_from_seed(seed), alpha, vrf.prove(seed, alpha)


def grind_proof(
    seed: bytes,
    alpha: bytes,
    public_key: bytes,
    gamma_torsion: bytes,
    accept_challenge: Callable[[int], bool],
) -> bytes:
    """Build a proof for an arbitrary public_key, with Gamma = x*H + gamma_torsion.

    A random nonce k is retried until accept_challenge(c) holds. This produces proofs
    whose torsion terms the verifier's U/V equations cancel (or fail to cancel) on purpose.
    """
    x, _ = vrf._expand_seed(seed)
    h = vrf._encode_to_curve(public_key, alpha)
    gamma = crypto_core_ed25519_add(vrf._mul_prime_order(x, h), gamma_torsion)
    for counter in itertools.count():
        k = vrf._reduce_scalar(hashlib.sha512(b"grind" + counter.to_bytes(8, "little")).digest())
        c_string = vrf._challenge(
            public_key, h, gamma, vrf._mul_base(k), vrf._mul_prime_order(k, h)
        )
        if accept_challenge(int.from_bytes(c_string, "little")):
            s = crypto_core_ed25519_scalar_add(
                k, crypto_core_ed25519_scalar_mul(c_string + bytes(16), x)
            )
            return gamma + c_string + s
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------
# RFC 9381 Appendix B.3 vectors
# --------------------------------------------------------------------------------------


def test_vector_file_cites_rfc_and_has_three_examples() -> None:
    document = json.loads(VECTORS_PATH.read_text())
    assert "RFC 9381" in document["comment"] and "B.3" in document["comment"]
    assert [v["name"] for v in VECTORS] == ["Example 16", "Example 17", "Example 18"]


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_public_key(vector: dict) -> None:
    assert vrf.public_key_from_seed(bytes.fromhex(vector["sk"])).hex() == vector["pk"]


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_prove_matches_pi_exactly(vector: dict) -> None:
    pi = vrf.prove(bytes.fromhex(vector["sk"]), bytes.fromhex(vector["alpha"]))
    assert pi.hex() == vector["pi"]


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_verify_returns_beta_exactly(vector: dict) -> None:
    beta = vrf.verify(
        bytes.fromhex(vector["pk"]), bytes.fromhex(vector["pi"]), bytes.fromhex(vector["alpha"])
    )
    assert beta.hex() == vector["beta"]


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_proof_to_hash_returns_beta_exactly(vector: dict) -> None:
    assert vrf.proof_to_hash(bytes.fromhex(vector["pi"])).hex() == vector["beta"]


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_intermediate_values(vector: dict) -> None:
    seed, alpha = bytes.fromhex(vector["sk"]), bytes.fromhex(vector["alpha"])
    digest = hashlib.sha512(seed).digest()
    clamped = (int.from_bytes(digest[:32], "little") & ~7 & ((1 << 254) - 1)) | (1 << 254)
    assert clamped.to_bytes(32, "little").hex() == vector["x"]
    x, nonce_key = vrf._expand_seed(seed)
    assert int.from_bytes(x, "little") == clamped % Q

    h = vrf._encode_to_curve(bytes.fromhex(vector["pk"]), alpha)
    assert h.hex() == vector["H"]
    k_string = hashlib.sha512(nonce_key + h).digest()
    assert k_string.hex() == vector["k"]
    k = vrf._nonce(nonce_key, h)
    assert vrf._mul_base(k).hex() == vector["U"]
    assert vrf._mul_prime_order(k, h).hex() == vector["V"]


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_try_and_increment_counter(vector: dict) -> None:
    """The first valid candidate appears at the counter the RFC reports."""
    prefix = b"\x03\x01" + bytes.fromhex(vector["pk"]) + bytes.fromhex(vector["alpha"])
    first_valid = next(
        ctr
        for ctr in range(256)
        if vrf._string_to_point(hashlib.sha512(prefix + bytes([ctr, 0])).digest()[:32])
    )
    assert first_valid == vector["ctr"]


# --------------------------------------------------------------------------------------
# Functional behaviour
# --------------------------------------------------------------------------------------


def test_public_key_equals_ed25519_public_key() -> None:
    rng = random.Random(1)
    for _ in range(20):
        seed = rng.randbytes(32)
        expected = bytes(nacl.signing.SigningKey(seed).verify_key)
        assert vrf.public_key_from_seed(seed) == expected


def test_round_trip_random_keys_and_inputs() -> None:
    rng = random.Random(2)
    for alpha_length in [0, 1, 2, 31, 32, 33, 64, 127, 1000, 65536]:
        seed = rng.randbytes(32)
        alpha = rng.randbytes(alpha_length)
        public_key = vrf.public_key_from_seed(seed)
        pi = vrf.prove(seed, alpha)
        assert len(pi) == vrf.PROOF_LEN
        beta = vrf.verify(public_key, pi, alpha)
        assert len(beta) == vrf.BETA_LEN
        assert beta == vrf.proof_to_hash(pi)


def test_accepts_bytearray_and_memoryview(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    seed, public_key, alpha, pi = honest
    assert vrf.prove(bytearray(seed), memoryview(alpha)) == pi
    beta = vrf.verify(memoryview(public_key), bytearray(pi), bytearray(alpha))
    assert beta == vrf.proof_to_hash(memoryview(pi))


def test_prove_is_deterministic(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    seed, _, alpha, pi = honest
    assert vrf.prove(seed, alpha) == pi
    assert vrf.prove(seed, alpha) == vrf.prove(bytes(seed), bytes(alpha))


def test_outputs_differ_across_inputs_and_keys(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    seed, _, alpha, pi = honest
    other_seed = hashlib.sha256(b"other seed").digest()
    betas = {
        vrf.proof_to_hash(pi),
        vrf.proof_to_hash(vrf.prove(seed, alpha + b"!")),
        vrf.proof_to_hash(vrf.prove(other_seed, alpha)),
    }
    assert len(betas) == 3


# --------------------------------------------------------------------------------------
# Rejection of forged or malformed proofs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("component", "bit_range"),
    [("Gamma", range(0, 256)), ("c", range(256, 384)), ("s", range(384, 640))],
)
def test_every_single_bit_flip_is_rejected(
    honest: tuple[bytes, bytes, bytes, bytes], component: str, bit_range: range
) -> None:
    _, public_key, alpha, pi = honest
    for bit_index in bit_range:
        with pytest.raises(vrf.VrfError):
            vrf.verify(public_key, flip_bit(pi, bit_index), alpha)


def test_wrong_alpha_is_rejected(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    _, public_key, alpha, pi = honest
    for wrong_alpha in [b"", alpha + b"\x00", alpha[:-1], b"Sample alpha"]:
        with pytest.raises(vrf.VrfError, match="does not verify"):
            vrf.verify(public_key, pi, wrong_alpha)


def test_wrong_public_key_is_rejected(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    _, _, alpha, pi = honest
    other_public_key = vrf.public_key_from_seed(hashlib.sha256(b"other seed").digest())
    with pytest.raises(vrf.VrfError, match="does not verify"):
        vrf.verify(other_public_key, pi, alpha)


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_proofs_rejected_under_other_vectors_keys(vector: dict) -> None:
    for other in VECTORS:
        if other is vector:
            continue
        with pytest.raises(vrf.VrfError):
            vrf.verify(
                bytes.fromhex(other["pk"]),
                bytes.fromhex(vector["pi"]),
                bytes.fromhex(vector["alpha"]),
            )


def test_s_not_reduced_mod_q_is_rejected(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    """s + q is congruent to s, so a verifier that reduced s would accept it. Ours rejects."""
    _, public_key, alpha, pi = honest
    s = int.from_bytes(pi[48:], "little")
    for bad_s in [s + Q, Q, Q + 1, 2**256 - 1]:
        forged = replace_s(pi, bad_s)
        with pytest.raises(vrf.VrfError, match="not reduced modulo q"):
            vrf.verify(public_key, forged, alpha)
        with pytest.raises(vrf.VrfError, match="not reduced modulo q"):
            vrf.proof_to_hash(forged)
    # Boundary: q - 1 is a well-formed (if wrong) s, so it fails on the challenge instead.
    with pytest.raises(vrf.VrfError, match="does not verify"):
        vrf.verify(public_key, replace_s(pi, Q - 1), alpha)


@pytest.mark.parametrize("length", [0, 1, 32, 48, 79, 81, 160])
def test_wrong_proof_length_is_rejected(
    honest: tuple[bytes, bytes, bytes, bytes], length: int
) -> None:
    _, public_key, alpha, pi = honest
    bad_pi = (pi * 2)[:length]
    with pytest.raises(vrf.VrfError, match="proof must be 80 bytes"):
        vrf.verify(public_key, bad_pi, alpha)
    with pytest.raises(vrf.VrfError, match="proof must be 80 bytes"):
        vrf.proof_to_hash(bad_pi)


def test_gamma_not_on_curve_or_non_canonical_is_rejected(
    honest: tuple[bytes, bytes, bytes, bytes],
) -> None:
    _, public_key, alpha, pi = honest
    not_on_curve = next(
        candidate
        for candidate in (i.to_bytes(32, "little") for i in itertools.count(2))
        if ref_decode(candidate) is None
    )
    for bad_gamma in [not_on_curve, *NON_CANONICAL_ENCODINGS]:
        forged = bad_gamma + pi[32:]
        with pytest.raises(vrf.VrfError, match="Gamma is not a valid"):
            vrf.verify(public_key, forged, alpha)
        with pytest.raises(vrf.VrfError, match="Gamma is not a valid"):
            vrf.proof_to_hash(forged)


def test_small_order_gamma_is_rejected(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    _, public_key, alpha, pi = honest
    for gamma in SMALL_ORDER_POINTS:
        with pytest.raises(vrf.VrfError, match="does not verify"):
            vrf.verify(public_key, gamma + pi[32:], alpha)


# --------------------------------------------------------------------------------------
# Public key validation
# --------------------------------------------------------------------------------------


def test_reference_list_of_small_order_points_is_correct() -> None:
    orders = []
    for encoded in SMALL_ORDER_POINTS:
        point = ref_decode(encoded)
        assert point is not None and ref_encode(point) == encoded
        orders.append(next(n for n in (1, 2, 4, 8) if ref_mul(n, point) == (0, 1)))
    assert sorted(orders) == [1, 2, 4, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("public_key", SMALL_ORDER_POINTS, ids=lambda b: b.hex()[:8])
def test_small_order_public_key_is_rejected(
    honest: tuple[bytes, bytes, bytes, bytes], public_key: bytes
) -> None:
    _, _, alpha, pi = honest
    with pytest.raises(vrf.VrfError, match="small-order"):
        vrf.verify(public_key, pi, alpha)


@pytest.mark.parametrize(
    "public_key", NON_CANONICAL_ENCODINGS, ids=lambda b: b.hex()[:8]
)
def test_non_canonical_public_key_is_rejected(
    honest: tuple[bytes, bytes, bytes, bytes], public_key: bytes
) -> None:
    _, _, alpha, pi = honest
    with pytest.raises(vrf.VrfError, match="not a valid edwards25519 point"):
        vrf.verify(public_key, pi, alpha)


def test_public_key_not_on_curve_or_wrong_length_is_rejected(
    honest: tuple[bytes, bytes, bytes, bytes],
) -> None:
    _, public_key, alpha, pi = honest
    off_curve = next(
        flip_bit(public_key, bit)
        for bit in range(255)
        if ref_decode(flip_bit(public_key, bit)) is None
    )
    with pytest.raises(vrf.VrfError, match="not a valid edwards25519 point"):
        vrf.verify(off_curve, pi, alpha)
    for bad_length_key in [public_key[:31], public_key + b"\x00", b""]:
        with pytest.raises(vrf.VrfError, match="public key must be 32 bytes"):
            vrf.verify(bad_length_key, pi, alpha)


# --------------------------------------------------------------------------------------
# Points with a torsion component: verification follows the RFC equations exactly
# --------------------------------------------------------------------------------------


def test_gamma_with_torsion_verifies_iff_equations_cancel(
    honest: tuple[bytes, bytes, bytes, bytes],
) -> None:
    """Gamma' = x*H + T with T of order 2. V = s*H - c*Gamma' = k*H - c*T equals k*H
    exactly when c is even. beta is unchanged because proof_to_hash clears the cofactor."""
    seed, public_key, alpha, pi = honest
    honest_beta = vrf.proof_to_hash(pi)

    even_c = grind_proof(seed, alpha, public_key, ORDER_2_POINT, lambda c: c % 2 == 0)
    assert vrf.verify(public_key, even_c, alpha) == honest_beta
    assert even_c[:32] != pi[:32]

    odd_c = grind_proof(seed, alpha, public_key, ORDER_2_POINT, lambda c: c % 2 == 1)
    with pytest.raises(vrf.VrfError, match="does not verify"):
        vrf.verify(public_key, odd_c, alpha)


def test_public_key_with_torsion_component_follows_rfc(
    honest: tuple[bytes, bytes, bytes, bytes],
) -> None:
    """RFC 9381 validate_key rejects only small-order keys. Y' = Y + T8 is a valid key, and
    U = s*B - c*Y' = k*B - c*T8 matches the prover's k*B only when c = 0 mod 8."""
    seed, public_key, alpha, _ = honest
    torsioned_key = crypto_core_ed25519_add(public_key, ORDER_8_POINT)

    cancelling = grind_proof(seed, alpha, torsioned_key, IDENTITY, lambda c: c % 8 == 0)
    assert vrf.verify(torsioned_key, cancelling, alpha) == vrf.proof_to_hash(cancelling)

    not_cancelling = grind_proof(seed, alpha, torsioned_key, IDENTITY, lambda c: c % 8 == 4)
    with pytest.raises(vrf.VrfError, match="does not verify"):
        vrf.verify(torsioned_key, not_cancelling, alpha)


# --------------------------------------------------------------------------------------
# Differential checks of internals against the reference arithmetic
# --------------------------------------------------------------------------------------


def test_string_to_point_matches_reference_decoder() -> None:
    rng = random.Random(3)
    samples = [rng.randbytes(32) for _ in range(2000)]
    samples += SMALL_ORDER_POINTS + NON_CANONICAL_ENCODINGS
    samples += [(P - i).to_bytes(32, "little") for i in range(1, 40)]
    samples += [((P - i) | (1 << 255)).to_bytes(32, "little") for i in range(1, 40)]
    valid_count = 0
    for sample in samples:
        reference = ref_decode(sample)
        assert (vrf._string_to_point(sample) is not None) == (reference is not None), sample.hex()
        if reference is not None:
            valid_count += 1
            assert ref_encode(reference) == sample  # valid means canonical
    assert 900 < valid_count < 1200  # about half of all random strings decode


def test_mul_any_matches_reference_on_points_with_torsion() -> None:
    rng = random.Random(4)
    prime_order_point = vrf.public_key_from_seed(rng.randbytes(32))
    points = [
        prime_order_point,
        *SMALL_ORDER_POINTS,
        *(crypto_core_ed25519_add(prime_order_point, t) for t in SMALL_ORDER_POINTS[1:]),
    ]
    scalars = [0, 1, 2, 7, 8, 9, Q - 1, Q, Q + 1, 8 * Q, 2**128 - 1]
    scalars += [rng.getrandbits(128) for _ in range(3)] + [rng.randrange(Q) for _ in range(3)]
    for point in points:
        reference_point = ref_decode(point)
        assert reference_point is not None
        for k in scalars:
            assert vrf._mul_any(k, point) == ref_encode(ref_mul(k, reference_point)), (
                point.hex(),
                k,
            )


def test_times_cofactor_and_small_order_detection() -> None:
    rng = random.Random(5)
    for _ in range(20):
        candidate = rng.randbytes(32)
        point = ref_decode(candidate)
        if point is None:
            continue
        assert vrf._times_cofactor(candidate) == ref_encode(ref_mul(8, point))
        assert not vrf._is_small_order(candidate)
    assert all(vrf._is_small_order(point) for point in SMALL_ORDER_POINTS)


# --------------------------------------------------------------------------------------
# API contract
# --------------------------------------------------------------------------------------


def test_vrf_error_is_value_error() -> None:
    assert issubclass(vrf.VrfError, ValueError)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_bad_seed_length_is_rejected(length: int) -> None:
    with pytest.raises(vrf.VrfError, match="seed must be 32 bytes"):
        vrf.prove(bytes(length), b"alpha")
    with pytest.raises(vrf.VrfError, match="seed must be 32 bytes"):
        vrf.public_key_from_seed(bytes(length))


def test_non_bytes_arguments_raise_type_error(honest: tuple[bytes, bytes, bytes, bytes]) -> None:
    seed, public_key, alpha, pi = honest
    with pytest.raises(TypeError):
        vrf.prove(seed.hex(), alpha)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vrf.prove(seed, "alpha")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vrf.verify(public_key, pi, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vrf.proof_to_hash(list(pi))  # type: ignore[arg-type]
