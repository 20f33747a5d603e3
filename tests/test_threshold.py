"""The threshold ritual with real ferveo crypto among peers attested by real (simulated-enclave)
records: every member gets the same key, a non-attested peer cannot take part, t-1 shares do
not decrypt, shares go only to attested requesters for their own request, and an
enhanced-privacy stage on the real digits model gives the plain result, sealed to the client."""

import os

import msgpack
import pytest
import torch

from p2p_infer.errors import DkgRefused, NotEnoughShares, ShareRefused, ThresholdError
from p2p_infer.identity import Identity
from p2p_infer.ml.models import Activation, load_model
from p2p_infer.proto.dkg import DEAL, JOIN, RitualMember, ShareReleaser, accept_key
from p2p_infer.proto.records import ShardSpec, make_record, sign_record, verify_record
from p2p_infer.ml.tensors import decode_tensor, encode_tensor
from p2p_infer.verify import tee, threshold

NOW = 1_764_000_000_000
N, T, RITUAL = 5, 3, 7


@pytest.fixture(scope="module")
def digits():
    return load_model("digits-mlp")


def _attested_set(digits, idents, bad=()):
    """Peer ids whose records (real, signed, sim-attested; ``bad`` ones forged) verify as attested."""
    manifests = {digits.model_id: digits.manifest}
    shards = [ShardSpec(digits.model_id, 1, 3)]
    ok = set()
    for ident in idents:
        attester = tee.SimAttester(root_seed=b"\x09" * 32) if ident.peer_id in bad else tee.SimAttester()
        kind, blob = tee.attest_record_fields(attester, ident.public_key, shards, manifests, NOW)
        record = verify_record(sign_record(make_record(ident, addrs=[], shards=shards, issued_at_ms=NOW, tee=kind, tee_attestation=blob), ident),
                               now=NOW)
        try:
            tee.check_record(record, manifests, tee.Policy.default(), NOW)
            ok.add(ident.peer_id)
        except tee.TeeError:
            pass
    return ok


def _ritual(idents, attested, t=T):
    expected = frozenset(i.peer_id for i in idents)
    return {i.peer_id: RitualMember(i, threshold.FerveoCrypto(), RITUAL, t, expected, attested.__contains__, threshold.RitualSpec)
            for i in idents}


def _run(members):
    """Deliver every member's messages to every other member until quiet; return the key messages."""
    queue = [(p, m.join()) for p, m in members.items()]
    keys = []
    while queue:
        sender, message = queue.pop(0)
        if message["type"] not in (JOIN, DEAL):
            keys.append(message)
            continue
        for peer, member in members.items():
            if peer != sender:
                queue += [(peer, out) for out in member.on_message(message)]
    return keys


@pytest.fixture(scope="module")
def ritual(digits):
    idents = [Identity.generate() for _ in range(N)]
    attested = _attested_set(digits, idents)
    assert len(attested) == N
    members = _ritual(idents, attested)
    keys = _run(members)
    return idents, attested, members, accept_key(keys, attested.__contains__)


def test_every_attested_member_gets_the_same_key_signed_by_all(ritual):
    idents, _, members, key = ritual
    assert (key.threshold, key.n, key.ritual_id) == (T, N, RITUAL)
    assert set(key.members) == {i.peer_id for i in idents}
    assert {m.public_key for m in members.values()} == {key.public_key}


def test_a_peer_without_a_valid_attestation_cannot_join(digits):
    idents = [Identity.generate() for _ in range(3)]
    outsider = Identity.generate()  # attested, but not listed for this ritual
    forged = idents[2].peer_id
    attested = _attested_set(digits, idents + [outsider], bad={forged})
    assert forged not in attested and outsider.peer_id in attested
    members = _ritual(idents, attested, t=2)
    join = members[forged].join()
    with pytest.raises(DkgRefused, match="no verified attestation"):
        members[idents[0].peer_id].on_message(join)
    stranger = RitualMember(outsider, threshold.FerveoCrypto(), RITUAL, 2, frozenset({outsider.peer_id, idents[0].peer_id}),
                            lambda _p: True, threshold.RitualSpec)
    with pytest.raises(DkgRefused, match="not a listed member|another ritual"):
        members[idents[0].peer_id].on_message(stranger.join())
    assert members[idents[0].peer_id].spec is None  # the ritual never formed


def _request(key, payload: bytes):
    request_id = os.urandom(16)
    aad = threshold.request_aad(key.ritual_id, request_id)
    return request_id, threshold.encrypt(payload, aad, key.public_key), aad


def test_t_minus_one_shares_do_not_decrypt_and_t_do(ritual):
    idents, _, members, key = ritual
    request_id, ciphertext, aad = _request(key, b"activation bytes")
    assert b"activation bytes" not in ciphertext  # a recording peer sees only this
    executor = idents[0].peer_id
    releasers = [ShareReleaser(members[i.peer_id], threshold.request_aad) for i in idents]
    shares = [r.release(executor, request_id, ciphertext) for r in releasers]
    with pytest.raises(NotEnoughShares):
        threshold.combine_and_decrypt(ciphertext, aad, shares[:T - 1], T)
    with pytest.raises(NotEnoughShares, match="failed"):  # the library's own check, not only our count
        threshold.combine_and_decrypt(ciphertext, aad, shares[:T - 1], T - 1)
    assert threshold.combine_and_decrypt(ciphertext, aad, shares[1:1 + T], T) == b"activation bytes"


def test_shares_only_to_attested_requesters_for_their_own_request(ritual):
    idents, _, members, key = ritual
    releaser = ShareReleaser(members[idents[1].peer_id], threshold.request_aad)
    request_id, ciphertext, _ = _request(key, b"secret")
    with pytest.raises(ShareRefused, match="no verified attestation"):
        releaser.release(Identity.generate().peer_id, request_id, ciphertext)
    with pytest.raises(ShareRefused, match="not bound to this request"):
        releaser.release(idents[0].peer_id, os.urandom(16), ciphertext)  # another request id
    releaser.release(idents[0].peer_id, request_id, ciphertext)
    with pytest.raises(ShareRefused, match="already released to another peer"):
        releaser.release(idents[2].peer_id, request_id, ciphertext)


def test_enhanced_privacy_stage_gives_the_plain_result_sealed_to_the_client(ritual, digits):
    """Client: embed + layer 0, encrypt to the DKG key. Executor (attested member): t shares,
    decrypt, layers 1-3, seal to the client's ephemeral key. Client: open, head."""
    idents, _, members, key = ritual
    pixels = digits.dataset()[2][3].tolist()
    act = digits.embed(pixels)
    act = Activation(digits.run_layers(act, 0, 0), act.mask)
    plain = digits.finish(Activation(digits.run_layers(act, 1, 3), act.mask))
    client_key = threshold.ephemeral_key()
    request_id, ciphertext, aad = _request(key, msgpack.packb(encode_tensor(act.hidden), use_bin_type=True))
    executor = idents[4].peer_id
    shares = [ShareReleaser(members[i.peer_id], threshold.request_aad).release(executor, request_id, ciphertext) for i in idents[:T]]
    hidden = decode_tensor(msgpack.unpackb(threshold.combine_and_decrypt(ciphertext, aad, shares, T)), field="hidden")
    sealed = threshold.seal(msgpack.packb(encode_tensor(digits.run_layers(Activation(hidden, None), 1, 3)), use_bin_type=True),
                            bytes(client_key.public_key))
    with pytest.raises(ThresholdError):
        threshold.open_sealed(sealed, threshold.ephemeral_key())  # nobody else opens it
    out = decode_tensor(msgpack.unpackb(threshold.open_sealed(sealed, client_key)), field="output")
    result = digits.finish(Activation(out, act.mask))
    assert result["class"] == plain["class"]
    assert torch.allclose(torch.tensor(result["probabilities"]), torch.tensor(plain["probabilities"]), atol=1e-6)


def test_key_messages_must_all_agree(ritual):
    idents, attested, members, key = ritual
    messages = [m.key_message() for m in members.values()]
    with pytest.raises(DkgRefused, match="not signed by member"):
        accept_key(messages[:-1], attested.__contains__)
    with pytest.raises(DkgRefused, match="no verified attestation"):
        accept_key(messages, lambda p: p != idents[0].peer_id)
