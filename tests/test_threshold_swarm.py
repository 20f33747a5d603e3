"""Enhanced privacy end to end: three simulated-enclave peers run a ferveo DKG over
/p2p-infer/dkg/1.0.0; a client's --enhanced-privacy query gives the plain result; a share
request from a non-attested peer is refused; with fewer than t members alive the request
cannot be decrypted. Real processes, real libp2p, real crypto."""

import json
import os
import subprocess
import sys
import time

import msgpack
import pytest
import trio

from p2p_infer.errors import RemoteError
from p2p_infer.ml.models import DigitsMLP, load_model
from p2p_infer.node.client import Client
from p2p_infer.proto.plan import QueryPlan
from p2p_infer.net.framing import request
from p2p_infer.net.host import dial, open_stream, parse_peer_addr
from p2p_infer.proto.wire import DKG_PROTOCOL
from p2p_infer.testing.harness import Swarm

from .conftest import light_host

pytestmark = pytest.mark.slow
TTL = 30.0
MEMBER = ["--tee", "sim", "--threshold-member", "--dkg-members", "3", "--dkg-threshold", "2"]


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    """Every request a member's host receives (P2P_INFER_DUMP_DIR): what a recording peer sees."""
    return tmp_path_factory.mktemp("dumps")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, dump_dir):
    with Swarm(tmp_path_factory.mktemp("threshold"), record_ttl=TTL, extra_env={"P2P_INFER_DUMP_DIR": str(dump_dir)}) as swarm:
        swarm.start_bootstrap()
        started = [swarm.start_peer(f"m{i}", ["digits-mlp:1-3"], extra_args=MEMBER, wait=False) for i in range(3)]
        swarm.wait_ready(started, timeout=180)
        swarm.wait_discoverable(timeout=90)
        yield swarm


def _private_query(swarm, check=True):
    return swarm.cli("query", "--model", "digits-mlp", "--enhanced-privacy", "--unverified", "--json", "--compare", "test:7", check=check)


def _sent_activation(index: int) -> bytes:
    """The bytes of the activation the client sends for test:INDEX (embedding + layer 0)."""
    digits = load_model("digits-mlp")
    act = digits.embed(DigitsMLP.dataset()[2][index].tolist())
    return digits.run_layers(act, 0, 0).detach().numpy().astype("float32").tobytes()


def test_enhanced_privacy_query_returns_the_plain_result(swarm, dump_dir):
    deadline = time.monotonic() + 120
    while True:  # the ritual forms once every member lists the others as attested
        result = _private_query(swarm, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    # a recording peer (any member's host, outside the enclave) holds only ciphertext of the request
    seen = [p.read_bytes() for p in dump_dir.iterdir()]
    private = [raw for raw in seen if msgpack.unpackb(raw)["type"] in ("private_forward", "share_request")]
    secret = _sent_activation(7)
    assert private and not any(secret in raw or secret[:64] in raw for raw in seen)
    plain = json.loads(swarm.cli("query", "--model", "digits-mlp", "--unverified", "--json", "test:7").stdout)
    assert out["output"]["class"] == plain["output"]["class"] and out["local_check"]["match"]
    members = {swarm.peers[f"m{i}"].peer_id for i in range(3)}
    assert out["privacy"]["threshold"] == 2 and set(out["privacy"]["members"]) == members
    assert out["mode"] == "enhanced-privacy t=2 of n=3"
    assert {h["peer"] for h in out["route"]} <= members and out["tee"]["all_attested"]


async def test_share_request_from_a_non_attested_peer_is_refused(swarm):
    target = swarm.peers["m1"]
    async with light_host() as host:
        info = parse_peer_addr(target.addr)
        await dial(host, info)
        stream = await open_stream(host, info.peer_id, DKG_PROTOCOL)
        with trio.fail_after(30), pytest.raises(RemoteError) as refused:
            await request(stream, {"type": "share_request", "request_id": os.urandom(16), "ciphertext": b"\x01" * 64})
    assert refused.value.code == "share_refused" and "no verified attestation" in refused.value.message


def test_a_peer_without_tee_cannot_join_the_dkg(tmp_path):
    result = subprocess.run([sys.executable, "-m", "p2p_infer.cli", "peer", "--key", str(tmp_path / "k"), "--threshold-member",
                             "--listen", "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode != 0 and "--threshold-member needs --tee" in result.stderr


async def test_fewer_than_t_live_members_cannot_decrypt(swarm):
    """A client holding the key: once two of three members are gone, the executor gets one
    share (its own) of the two needed, and the request stays closed."""
    pixels = DigitsMLP.dataset()[2][7].tolist()
    async with Client([swarm.bootstrap.addr], plan=QueryPlan(privacy="threshold", checks=()), refresh_interval=3600) as client:
        assert (await client.run("digits-mlp", pixels)).privacy["threshold"] == 2
        for name in ("m1", "m2"):
            swarm.kill(name)
            client.directory.forget(swarm.peers[name].peer_id)  # route to m0; m0 still lists them and asks
        with pytest.raises(RemoteError, match="1 of 2 decryption shares") as failed:
            await client.run("digits-mlp", pixels)
        assert failed.value.code == "not_enough_shares"
