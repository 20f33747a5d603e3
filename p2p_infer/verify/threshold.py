"""Threshold encryption among attested peers: nucypher-core's ferveo DKG, and sealed results.

Nothing here is hand-rolled: the DKG (PVSS transcripts, aggregation and its check), the
encryption to the DKG key with associated data, the decryption shares and their combination
are ``nucypher_core.ferveo`` (the protocol library of the Threshold network's TACo); the
result sealed to the client's ephemeral key is PyNaCl's sealed box (X25519 + XSalsa20-Poly1305).
This module implements the ``DkgCrypto`` interface the sans-IO ritual (``proto/dkg.py``) uses.

Validators are named in ferveo by an Ethereum-style address; ours is derived from the peer id
(:func:`address_of`), and a member's share index is its position in the sorted member list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nacl.public
from nucypher_core import ferveo

from ..errors import NotEnoughShares, ShareRefused, ThresholdError

AAD_DOMAIN = b"p2p-infer/threshold-aad/v1\n"


def address_of(peer_id: str) -> str:
    return "0x" + hashlib.sha256(peer_id.encode()).digest()[:20].hex()


def request_aad(ritual_id: int, request_id: bytes) -> bytes:
    """The associated data a request's ciphertext is bound to: the ritual and the request id."""
    return AAD_DOMAIN + ritual_id.to_bytes(8, "big") + request_id


@dataclass(frozen=True)
class RitualSpec:
    ritual_id: int  # ferveo's tau
    threshold: int
    members: tuple[tuple[str, bytes], ...]  # (peer id, ferveo public key), sorted by peer id

    @property
    def n(self) -> int:
        return len(self.members)

    def validators(self) -> list[ferveo.Validator]:
        return [ferveo.Validator(address_of(p), ferveo.FerveoPublicKey.from_bytes(pk), i) for i, (p, pk) in enumerate(self.members)]

    def dkg(self, me: str) -> ferveo.Dkg:
        validators = self.validators()
        mine = [v for v, (p, _) in zip(validators, self.members) if p == me]
        if not mine:
            raise ThresholdError(f"{me} is not a member of ritual {self.ritual_id}")
        return ferveo.Dkg(self.ritual_id, self.n, self.threshold, validators, mine[0])


class FerveoCrypto:
    """One member's key and the ferveo calls of a ritual (implements proto/dkg.DkgCrypto)."""

    def __init__(self, keypair: ferveo.Keypair | None = None) -> None:
        self.keypair = keypair or ferveo.Keypair.random()

    @property
    def public_key(self) -> bytes:
        return bytes(self.keypair.public_key())

    def deal(self, spec: RitualSpec, me: str) -> bytes:
        return bytes(spec.dkg(me).generate_transcript())

    def aggregate(self, spec: RitualSpec, me: str, transcripts: Mapping[str, bytes]) -> tuple[bytes, bytes]:
        """(aggregated transcript, DKG public key) from every member's transcript, checked."""
        messages = _messages(spec, transcripts)
        try:
            aggregate = spec.dkg(me).aggregate_transcripts(messages)
            if not aggregate.verify(spec.n, messages):
                raise ThresholdError("aggregated transcript does not verify")
        except Exception as exc:  # ferveo raises one exception type per failure
            raise ThresholdError(f"DKG aggregation failed: {type(exc).__name__} {exc}") from None
        return bytes(aggregate), bytes(aggregate.public_key)

    def share(self, spec: RitualSpec, me: str, aggregate: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """My decryption share for ``ciphertext``, which must have been encrypted with ``aad``."""
        try:
            header = ferveo.Ciphertext.from_bytes(ciphertext).header
            share = ferveo.AggregatedTranscript.from_bytes(aggregate).create_decryption_share_simple(spec.dkg(me), header, aad, self.keypair)
        except BaseException as exc:  # ferveo panics (a BaseException) on a header not made with this aad
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ShareRefused(f"ciphertext is not bound to this request ({type(exc).__name__})") from None
        return bytes(share)


def _messages(spec: RitualSpec, transcripts: Mapping[str, bytes]) -> list[ferveo.ValidatorMessage]:
    by_peer = {p: v for v, (p, _) in zip(spec.validators(), spec.members)}
    try:
        return [ferveo.ValidatorMessage(by_peer[p], ferveo.Transcript.from_bytes(t)) for p, t in sorted(transcripts.items())]
    except KeyError as exc:
        raise ThresholdError(f"transcript from a non-member {exc}") from None
    except Exception as exc:
        raise ThresholdError(f"malformed transcript: {exc}") from None


def encrypt(message: bytes, aad: bytes, dkg_public_key: bytes) -> bytes:
    return bytes(ferveo.encrypt(message, aad, ferveo.DkgPublicKey.from_bytes(dkg_public_key)))


def combine_and_decrypt(ciphertext: bytes, aad: bytes, shares: Sequence[bytes], threshold: int) -> bytes:
    """The plaintext from at least ``threshold`` shares; NotEnoughShares otherwise (ferveo checks too)."""
    if len(shares) < threshold:
        raise NotEnoughShares(f"{len(shares)} decryption share(s), threshold {threshold}")
    try:
        secret = ferveo.combine_decryption_shares_simple([ferveo.DecryptionShareSimple.from_bytes(s) for s in shares])
        return bytes(ferveo.decrypt_with_shared_secret(ferveo.Ciphertext.from_bytes(ciphertext), aad, secret))
    except Exception as exc:
        raise NotEnoughShares(f"decryption with {len(shares)} share(s) failed: {exc}") from None


# ---- results back to the client ----


def ephemeral_key() -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey.generate()


def seal(result: bytes, client_public_key: bytes) -> bytes:
    return bytes(nacl.public.SealedBox(nacl.public.PublicKey(client_public_key)).encrypt(result))


def open_sealed(sealed: bytes, key: nacl.public.PrivateKey) -> bytes:
    try:
        return bytes(nacl.public.SealedBox(key).decrypt(sealed))
    except Exception as exc:
        raise ThresholdError(f"sealed result does not open: {exc}") from None
