import os
import stat

import pytest
from libp2p.peer.id import ID

from p2p_infer.net.host import key_pair
from p2p_infer.identity import (
    Identity,
    IdentityError,
    load_identity,
    load_or_create_identity,
    verify_signature,
)


def test_key_is_created_owner_only_and_reloaded(tmp_path):
    path = tmp_path / "sub" / "peer.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 36
    assert load_or_create_identity(path) == first


def test_peer_id_matches_libp2p_derivation():
    ident = Identity.generate()
    assert ID.from_pubkey(key_pair(ident).public_key).to_base58() == ident.peer_id
    assert ident.peer_id.startswith("12D3KooW")


def test_key_file_is_readable_by_libp2p(tmp_path):
    from libp2p import load_identity as libp2p_load

    path = tmp_path / "peer.key"
    ident = load_or_create_identity(path)
    kp = libp2p_load(str(path))
    assert ID.from_pubkey(kp.public_key).to_base58() == ident.peer_id


def test_world_readable_key_is_refused(tmp_path):
    path = tmp_path / "peer.key"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_identity(path)


def test_garbage_key_file_is_refused(tmp_path):
    path = tmp_path / "peer.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not an Ed25519"):
        load_identity(path)


def test_signatures_verify_only_for_the_right_key_and_message():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"hello")
    assert verify_signature(a.public_key, b"hello", sig)
    assert not verify_signature(b.public_key, b"hello", sig)
    assert not verify_signature(a.public_key, b"hellO", sig)
    assert not verify_signature(a.public_key, b"hello", sig[:-1] + bytes([sig[-1] ^ 1]))


KILLED_MID_CREATE = """
import os, signal, sys
from pathlib import Path
from p2p_infer import identity
real_link = os.link
def link_then_die(src, dst):  # the temp key is written and fsynced; die before it is in place
    os.kill(os.getpid(), signal.SIGKILL)
os.link = link_then_die
identity.load_or_create_identity(Path(sys.argv[1]))
"""


def test_kill_during_key_creation_restarts_cleanly(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "peer.key"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_CREATE, str(path)], capture_output=True)
    assert proc.returncode == -9
    assert not path.exists()  # never a half-written key in place
    first = load_or_create_identity(path)
    assert load_or_create_identity(path) == first


def test_empty_key_file_from_an_interrupted_creation_is_replaced(tmp_path):
    path = tmp_path / "peer.key"
    path.touch(mode=0o600)
    ident = load_or_create_identity(path)
    assert load_or_create_identity(path) == ident and path.stat().st_size == 36
