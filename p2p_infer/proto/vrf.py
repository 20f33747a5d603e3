"""ECVRF-EDWARDS25519-SHA512-TAI, the RFC 9381 elliptic-curve VRF (suite_string 0x03).

A verifiable random function maps an input ``alpha`` to a pseudorandom 64-byte output
``beta``. Only the holder of the secret key (a 32-byte Ed25519 seed) can compute it, and
the 80-byte proof ``pi`` lets anyone holding the public key check ``beta``.

Suite parameters (RFC 9381 section 5.5):

* Group: edwards25519 from RFC 8032, cofactor 8, prime order
  q = 2^252 + 27742317777372353535851937790883648493, generator B.
* Hash: SHA-512. ptLen = qLen = 32 bytes, cLen = 16 bytes. Integers are little-endian.
* Keys (RFC 8032 section 5.1.5): x = clamp(SHA-512(seed)[:32]), Y = x*B. So the VRF
  public key is the seed's Ed25519 public key.
* encode_to_curve, try-and-increment (section 5.4.1.1): take the first 32 bytes of
  SHA-512(0x03 || 0x01 || PK || alpha || ctr || 0x00) as an RFC 8032 point encoding,
  increasing ctr until the encoding is valid, then multiply by the cofactor.
* Nonce (section 5.4.2.2, as in RFC 8032):
  k = SHA-512(SHA-512(seed)[32:] || point_to_string(H)) mod q.
* Challenge (section 5.4.3): c = first 16 bytes of
  SHA-512(0x03 || 0x02 || Y || H || Gamma || U || V || 0x00).
* Proof (section 5.5): pi = Gamma (32 bytes) || c (16 bytes) || s (32 bytes), with
  Gamma = x*H and s = k + c*x mod q.
* Output (section 5.2): beta = SHA-512(0x03 || 0x03 || point_to_string(8*Gamma) || 0x00).

Implementation notes:

* A point is always held as its canonical 32-byte RFC 8032 encoding. Decoding
  (string_to_point) is written in pure Python so it follows RFC 8032 section 5.1.3
  exactly: it rejects y >= p, and x = 0 with the sign bit set.
* Group arithmetic uses libsodium through PyNaCl. libsodium multiplies only points of the
  prime-order subgroup. RFC 9381 still lets a public key or Gamma carry a small torsion
  component. Such a point is split into P = P1 + T (P1 of prime order, 8*T = 0) and each
  part is multiplied separately. Verification therefore evaluates the RFC equations on the
  whole curve. It neither rejects nor silently "cleans" such points.
* Secret scalars (x, k, s) are computed with libsodium's scalar routines, not Python ints.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache
from typing import Final

from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_is_valid_point,
    crypto_core_ed25519_scalar_add,
    crypto_core_ed25519_scalar_mul,
    crypto_core_ed25519_scalar_reduce,
    crypto_core_ed25519_sub,
    crypto_scalarmult_ed25519_base_noclamp,
    crypto_scalarmult_ed25519_noclamp,
)

from ..errors import VrfError

__all__ = [
    "BETA_LEN",
    "PROOF_LEN",
    "PUBLIC_KEY_LEN",
    "SEED_LEN",
    "SUITE_STRING",
    "VrfError",
    "proof_to_hash",
    "prove",
    "public_key_from_seed",
    "verify",
]

SUITE_STRING: Final[bytes] = b"\x03"
SEED_LEN: Final[int] = 32
PUBLIC_KEY_LEN: Final[int] = 32
PROOF_LEN: Final[int] = 80
BETA_LEN: Final[int] = 64

_PT_LEN: Final[int] = 32
_C_LEN: Final[int] = 16
_Q_LEN: Final[int] = 32

_P: Final[int] = 2**255 - 19
_Q: Final[int] = 2**252 + 27742317777372353535851937790883648493
_D: Final[int] = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1: Final[int] = pow(2, (_P - 1) // 4, _P)

_IDENTITY: Final[bytes] = b"\x01" + bytes(31)  # encoding of the neutral point (0, 1)
_ZERO_SCALAR: Final[bytes] = bytes(32)
# 8 * (8^-1 mod q) is 1 mod q and 0 mod 8. Multiplying 8*P by 8^-1 therefore gives the
# prime-order part of P.
_INV_COFACTOR_SCALAR: Final[bytes] = pow(8, -1, _Q).to_bytes(32, "little")

# Domain separators from RFC 9381 sections 5.2, 5.4.1.1 and 5.4.3.
_ENCODE_TO_CURVE_FRONT: Final[bytes] = b"\x01"
_CHALLENGE_FRONT: Final[bytes] = b"\x02"
_PROOF_TO_HASH_FRONT: Final[bytes] = b"\x03"
_DOMAIN_SEPARATOR_BACK: Final[bytes] = b"\x00"


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _as_bytes(value: bytes | bytearray | memoryview, name: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}")
    return bytes(value)


def _require_length(value: bytes, length: int, name: str) -> None:
    if len(value) != length:
        raise VrfError(f"{name} must be {length} bytes, got {len(value)}")


# --------------------------------------------------------------------------------------
# Points (canonical 32-byte encodings) and scalars (32-byte little-endian, < q)
# --------------------------------------------------------------------------------------


def _string_to_point(encoded: bytes) -> bytes | None:
    """Decode as RFC 8032 section 5.1.3 does. Return the encoding if valid, else None.

    A successful decode implies the encoding is canonical, so the input bytes themselves
    serve as the point's representation.
    """
    if len(encoded) != _PT_LEN:
        return None
    y = int.from_bytes(encoded, "little")
    x_sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        return None  # non-canonical y
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    # Candidate square root of u/v, computed without an inversion (RFC 8032).
    v3 = v * v * v % _P
    x = u * v3 * pow(u * v3 * v3 * v, (_P - 5) // 8, _P) % _P
    v_x2 = v * x * x % _P
    if v_x2 == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif v_x2 != u:
        return None  # u/v is not a square, so no point has this y
    if x == 0 and x_sign == 1:
        return None  # "-0" has no point and would be a second encoding of x = 0
    return encoded


def _string_to_point_fast(encoded: bytes) -> bytes | None:
    """``_string_to_point`` with a shortcut for the common case: libsodium accepts only
    canonical encodings of points of the prime-order subgroup (never x = 0, which only
    small-order points have), so its yes implies RFC 8032 decoding succeeds; anything
    else (a torsion component, an invalid encoding) takes the exact pure-Python path."""
    if len(encoded) == _PT_LEN and crypto_core_ed25519_is_valid_point(encoded):
        return encoded
    return _string_to_point(encoded)


def _times_cofactor(point: bytes) -> bytes:
    # Three doublings. libsodium's point addition accepts any point on the curve, but its
    # scalar multiplication would reject points outside the prime-order subgroup.
    for _ in range(3):
        point = crypto_core_ed25519_add(point, point)
    return point


def _is_small_order(point: bytes) -> bool:
    return _times_cofactor(point) == _IDENTITY


def _mul_base(scalar: bytes) -> bytes:
    """Return scalar*B for a canonical scalar (< q)."""
    if scalar == _ZERO_SCALAR:
        return _IDENTITY  # libsodium reports the identity result as an error
    return crypto_scalarmult_ed25519_base_noclamp(scalar)


def _mul_prime_order(scalar: bytes, point: bytes) -> bytes:
    """Return scalar*point. The scalar is canonical (< q) and the point lies in the
    prime-order subgroup (the identity included)."""
    if scalar == _ZERO_SCALAR or point == _IDENTITY:
        return _IDENTITY
    return crypto_scalarmult_ed25519_noclamp(scalar, point)


def _mul_small(multiplier: int, point: bytes) -> bytes:
    """Return multiplier*point for a multiplier of 0 to 7 (a torsion point has order <= 8)."""
    result = _IDENTITY
    for _ in range(multiplier):
        result = crypto_core_ed25519_add(result, point)
    return result


def _mul_any(k: int, point: bytes) -> bytes:
    """Return k*point for any curve point, even one with a torsion component."""
    k_mod_q = (k % _Q).to_bytes(32, "little")
    if crypto_core_ed25519_is_valid_point(point):  # prime order, so libsodium accepts it
        return _mul_prime_order(k_mod_q, point)
    # Split point = prime_part + torsion_part. k*torsion_part depends only on k mod 8.
    prime_part = _mul_prime_order(_INV_COFACTOR_SCALAR, _times_cofactor(point))
    torsion_part = crypto_core_ed25519_sub(point, prime_part)
    return crypto_core_ed25519_add(
        _mul_prime_order(k_mod_q, prime_part), _mul_small(k % 8, torsion_part)
    )


def _reduce_scalar(little_endian: bytes) -> bytes:
    """Reduce a little-endian integer of up to 64 bytes modulo q."""
    return crypto_core_ed25519_scalar_reduce(little_endian.ljust(64, b"\x00"))


# --------------------------------------------------------------------------------------
# RFC 9381 building blocks
# --------------------------------------------------------------------------------------


def _expand_seed(seed: bytes) -> tuple[bytes, bytes]:
    """RFC 8032 section 5.1.5. Return (x mod q, the nonce key SHA-512(seed)[32:])."""
    digest = hashlib.sha512(seed).digest()
    clamped = bytearray(digest[:32])
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    # Reducing x mod q is safe: x only multiplies prime-order points (B, H) and goes into
    # s mod q.
    return _reduce_scalar(bytes(clamped)), digest[32:]


def _encode_to_curve(public_key: bytes, alpha: bytes) -> bytes:
    """RFC 9381 section 5.4.1.1, try-and-increment, with the salt PK_string = public_key."""
    prefix = hashlib.sha512(SUITE_STRING + _ENCODE_TO_CURVE_FRONT + public_key + alpha)
    for ctr in range(256):  # ctr_string = int_to_string(ctr, 1)
        attempt = prefix.copy()
        attempt.update(bytes([ctr]) + _DOMAIN_SEPARATOR_BACK)
        candidate = _string_to_point(attempt.digest()[:_PT_LEN])
        if candidate is None:
            continue
        h = _times_cofactor(candidate)
        if h != _IDENTITY:  # the RFC loops "while H is INVALID or the identity element"
            return h
    raise VrfError("encode_to_curve exhausted its counter (probability about 2^-256)")


def _nonce(nonce_key: bytes, h_string: bytes) -> bytes:
    """RFC 9381 section 5.4.2.2: k = SHA-512(SHA-512(SK)[32:] || h_string) mod q."""
    return _reduce_scalar(hashlib.sha512(nonce_key + h_string).digest())


def _challenge(y: bytes, h: bytes, gamma: bytes, u: bytes, v: bytes) -> bytes:
    """RFC 9381 section 5.4.3. Return c_string, the first cLen bytes of the hash."""
    hashed = hashlib.sha512(
        SUITE_STRING + _CHALLENGE_FRONT + y + h + gamma + u + v + _DOMAIN_SEPARATOR_BACK
    )
    return hashed.digest()[:_C_LEN]


def _decode_proof(pi: bytes) -> tuple[bytes, bytes, bytes]:
    """RFC 9381 section 5.4.4. Return (Gamma, c_string, s_string) or raise VrfError."""
    _require_length(pi, PROOF_LEN, "proof")
    gamma = _string_to_point_fast(pi[:_PT_LEN])
    if gamma is None:
        raise VrfError("proof Gamma is not a valid edwards25519 point encoding")
    c_string = pi[_PT_LEN : _PT_LEN + _C_LEN]
    s_string = pi[_PT_LEN + _C_LEN :]
    if int.from_bytes(s_string, "little") >= _Q:
        raise VrfError("proof scalar s is not reduced modulo q")
    return gamma, c_string, s_string


@lru_cache(maxsize=4096)  # a pure function of the key; the same candidates come back every query
def _validate_public_key(public_key: bytes) -> bytes:
    """string_to_point plus ECVRF_validate_key (RFC 9381 section 5.4.5)."""
    _require_length(public_key, PUBLIC_KEY_LEN, "public key")
    y = _string_to_point_fast(public_key)
    if y is None:
        raise VrfError("public key is not a valid edwards25519 point encoding")
    if _is_small_order(y):
        raise VrfError("public key is a small-order point")
    return y


def _gamma_to_hash(gamma: bytes) -> bytes:
    """RFC 9381 section 5.2. Multiplying by the cofactor discards any torsion in Gamma."""
    return hashlib.sha512(
        SUITE_STRING + _PROOF_TO_HASH_FRONT + _times_cofactor(gamma) + _DOMAIN_SEPARATOR_BACK
    ).digest()


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def public_key_from_seed(seed32: bytes) -> bytes:
    """Return the 32-byte VRF public key Y = x*B. It equals the seed's Ed25519 public key."""
    seed = _as_bytes(seed32, "seed")
    _require_length(seed, SEED_LEN, "secret key seed")
    x, _ = _expand_seed(seed)
    return _mul_base(x)


def prove(secret_key_seed32: bytes, alpha: bytes) -> bytes:
    """Return the 80-byte proof pi for input alpha (RFC 9381 section 5.1). Deterministic."""
    seed = _as_bytes(secret_key_seed32, "secret_key_seed32")
    alpha = _as_bytes(alpha, "alpha")
    _require_length(seed, SEED_LEN, "secret key seed")
    x, nonce_key = _expand_seed(seed)
    y = _mul_base(x)
    h = _encode_to_curve(y, alpha)
    gamma = _mul_prime_order(x, h)
    k = _nonce(nonce_key, h)
    c_string = _challenge(y, h, gamma, _mul_base(k), _mul_prime_order(k, h))
    c_scalar = c_string + bytes(_Q_LEN - _C_LEN)  # c < 2^128 < q, already canonical
    s_string = crypto_core_ed25519_scalar_add(k, crypto_core_ed25519_scalar_mul(c_scalar, x))
    return gamma + c_string + s_string


def verify(public_key32: bytes, pi: bytes, alpha: bytes) -> bytes:
    """Check pi for alpha under public_key32 (RFC 9381 section 5.3, validate_key=TRUE).

    Return the 64-byte output beta. Raise VrfError if the key or the proof is invalid.
    """
    public_key = _as_bytes(public_key32, "public_key32")
    pi = _as_bytes(pi, "pi")
    alpha = _as_bytes(alpha, "alpha")
    y = _validate_public_key(public_key)
    gamma, c_string, s_string = _decode_proof(pi)
    h = _encode_to_curve(y, alpha)
    c = int.from_bytes(c_string, "little")
    # Y and Gamma come from an untrusted party and may carry torsion. H is the cofactor
    # multiple of a point and never the identity, so it has prime order.
    u = crypto_core_ed25519_sub(_mul_base(s_string), _mul_any(c, y))
    v = crypto_core_ed25519_sub(_mul_prime_order(s_string, h), _mul_any(c, gamma))
    if not hmac.compare_digest(_challenge(y, h, gamma, u, v), c_string):
        raise VrfError("proof does not verify")
    return _gamma_to_hash(gamma)


def proof_to_hash(pi: bytes) -> bytes:
    """Return beta from a proof (RFC 9381 section 5.2) WITHOUT verifying it.

    Only the proof's encoding is checked: its length, the Gamma point and s < q. Use
    verify() for anything that was not produced locally by prove().
    """
    gamma, _, _ = _decode_proof(_as_bytes(pi, "pi"))
    return _gamma_to_hash(gamma)
