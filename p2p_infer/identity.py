"""Peer identity: a persistent Ed25519 key, its libp2p peer id, and signatures.

The key file holds the libp2p protobuf encoding of the private key (type Ed25519,
32-byte seed: 36 bytes in all), so ``libp2p.load_identity`` reads the same file. The
peer id is the identity multihash of the protobuf-encoded public key, exactly as
libp2p derives it; computing it here keeps record verification free of libp2p.

Identities are costly (S/Kademlia's static puzzle): a key counts only if
``SHA-256(SHA-256(peer id bytes))`` starts with ``PUZZLE_DIFFICULTY`` zero bits, so every
identity costs about ``2**PUZZLE_DIFFICULTY`` key derivations to make and one hash to check.
Records, tickets and candidate sets of keys that do not solve it are refused
(``protocols/records.md``, ``docs/consensus.md`` for what that buys and what it does not).
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import base58
import hashlib

import nacl.exceptions
import nacl.signing
from nacl.bindings import crypto_sign_seed_keypair

from .errors import IdentityError, PuzzleUnsolved
from .files import fsync_dir

_ED25519_PRIVATE_PREFIX = b"\x08\x01\x12\x20"  # protobuf: KeyType=Ed25519, Data=<32 bytes>
_ED25519_PUBLIC_PREFIX = b"\x08\x01\x12\x20"
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"  # multihash code 0x00 (identity), length 36
# 12 bits: ~4096 key derivations, ~0.1 CPU-s per identity at ~25 us each (fast enough for
# tests that make hundreds of keys). Each extra bit doubles the cost; it is a protocol
# constant (records schema 2), so changing it is a protocol version bump.
PUZZLE_DIFFICULTY = 12


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair and the peer id derived from it."""

    seed: bytes
    public_key: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        public = bytes(nacl.signing.SigningKey(seed).verify_key)
        return cls(seed=seed, public_key=public)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key that solves the identity puzzle (about 2**PUZZLE_DIFFICULTY tries)."""
        while True:
            seed = os.urandom(32)
            public, _ = crypto_sign_seed_keypair(seed)  # the cheapest Ed25519 derivation PyNaCl offers
            if solves_puzzle(public):
                return cls(seed=seed, public_key=public)

    @property
    def solves_puzzle(self) -> bool:
        return solves_puzzle(self.public_key)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return _signing_key(self.seed).sign(message).signature


@functools.lru_cache(maxsize=64)
def _signing_key(seed: bytes) -> nacl.signing.SigningKey:
    """A seed's signing key, derived once: a signature then costs one Ed25519 sign, not a
    key derivation as well (peers sign every commit, reveal, record and audit-log entry)."""
    return nacl.signing.SigningKey(seed)


def peer_id_bytes_from_public_key(public_key: bytes) -> bytes:
    if len(public_key) != 32:
        raise IdentityError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return _IDENTITY_MULTIHASH_PREFIX + _ED25519_PUBLIC_PREFIX + public_key


@functools.lru_cache(maxsize=8192)
def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 peer id ("12D3KooW...") libp2p derives from an Ed25519 key (memoised: a
    committee message names the same few keys several times, and base58 is slow Python)."""
    return base58.b58encode(peer_id_bytes_from_public_key(public_key)).decode()


def puzzle_hash(public_key: bytes) -> bytes:
    """``SHA-256(SHA-256(peer id bytes))``: the value the identity puzzle constrains."""
    return hashlib.sha256(hashlib.sha256(peer_id_bytes_from_public_key(public_key)).digest()).digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solves_puzzle(public_key: bytes, difficulty: int = PUZZLE_DIFFICULTY) -> bool:
    """Whether the key's peer id is a solved identity puzzle (False for malformed keys)."""
    if len(public_key) != 32:
        return False
    return leading_zero_bits(puzzle_hash(public_key)) >= difficulty


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


def save_identity(identity: Identity, path: Path) -> None:
    """Write the key file with owner-only permissions, crash-safe: the key goes to a 0600
    temp file that is fsynced and then hard-linked into place, so a kill at any point
    leaves either no key file or a whole one, and an existing key is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_ED25519_PRIVATE_PREFIX + identity.seed)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and raises FileExistsError instead of overwriting
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def load_identity(path: Path) -> Identity:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"key file {path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    raw = path.read_bytes()
    if len(raw) != 36 or not raw.startswith(_ED25519_PRIVATE_PREFIX):
        raise IdentityError(f"key file {path} is not an Ed25519 libp2p private key")
    return Identity.from_seed(raw[4:])


def load_or_create_identity(path: Path) -> Identity:
    """Load the peer's key, creating it on first run."""
    if path.exists() and path.stat().st_size == 0:
        # Only a creation killed half-way by an older version leaves an empty key file:
        # it never held a key, so nothing is lost by creating one.
        path.unlink(missing_ok=True)
    if path.exists():
        return _require_puzzle(load_identity(path), path)
    identity = Identity.generate()
    try:
        save_identity(identity, path)
    except FileExistsError:  # another process created it between exists() and open()
        return _require_puzzle(load_identity(path), path)
    return identity


def _require_puzzle(identity: Identity, path: Path) -> Identity:
    # A key made before the puzzle existed would start a peer whose records everyone
    # refuses: say so at start instead of serving nobody. It is never replaced silently.
    if not identity.solves_puzzle:
        raise PuzzleUnsolved(f"key file {path} ({identity.peer_id}) does not solve the identity puzzle "
                             f"({PUZZLE_DIFFICULTY} leading zero bits); move it aside to create a new key")
    return identity
