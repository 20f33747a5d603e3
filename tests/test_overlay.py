"""The overlay end to end: a bootstrap peer and 5 peers as separate processes on loopback,
light clients started afterwards, a SIGKILLed peer, a forger, and bad input on the wire."""

import json
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import trio
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from p2p_infer.net.dht import Discovery
from p2p_infer.errors import PeerUnreachable
from p2p_infer.proto.wire import FORWARD_PROTOCOL
from p2p_infer.net.framing import read_message, request
from p2p_infer.net.host import dial, open_stream, parse_peer_addr
from p2p_infer.ml.models import manifest_for
from p2p_infer.proto.records import ShardSpec, shard_key
from p2p_infer.testing.harness import Swarm

from .conftest import TESTS, light_host

pytestmark = pytest.mark.slow
SERVES = [["digits-mlp:1-1"], ["digits-mlp:2-2"], ["digits-mlp:3-3"], ["digits-mlp:1-2"], ["digits-mlp:2-3"]]
TTL = 8.0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("overlay"), record_ttl=TTL) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(SERVES)
        yield swarm


def test_light_client_lists_all_peers_with_verified_capabilities(swarm):
    listed = swarm.wait_discoverable(timeout=60)
    digits = manifest_for("digits-mlp").model_id
    for peer in swarm.serving():
        entry = listed[peer.peer_id]
        want = [(digits, *map(int, s.split(":")[1].split("-"))) for s in peer.serve]
        assert [(s["model_id"], s["first"], s["last"]) for s in entry["shards"]] == want
        assert entry["throughput"] > 0 and entry["tee"] == "none"
        assert entry["expires_in_s"] > 0
        assert "/p2p-infer/forward/1.0.0" in entry["protocols"]
        assert any(peer.peer_id in a for a in entry["addrs"])
    assert swarm.bootstrap.peer_id in listed  # the bootstrap peer is an ordinary peer with a record


async def test_providers_of_each_shard_are_found_through_the_dht(swarm):
    digits = manifest_for("digits-mlp").model_id
    async with light_host() as host:
        discovery = Discovery(host, server=False, bootstrap=[parse_peer_addr(swarm.bootstrap.addr)])
        async with background_trio_service(discovery.kad):
            assert await discovery.join() == 1
            for peer in swarm.serving():
                for serve in peer.serve:
                    first, last = map(int, serve.split(":")[1].split("-"))
                    providers = await discovery.find_providers(shard_key(ShardSpec(digits, first, last)))
                    assert peer.peer_id in {str(p.peer_id) for p in providers}, serve


async def test_bad_input_on_the_wire_gets_errors_and_the_peer_keeps_serving(swarm):
    target = swarm.peers["peer0"]
    async with light_host() as host:
        info = parse_peer_addr(target.addr)
        await dial(host, info)

        async def raw(frame: bytes) -> dict:
            stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
            await stream.write(frame)
            with trio.fail_after(10):
                return await read_message(stream)

        reply = await raw((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")
        assert reply["type"] == "error" and reply["code"] == "bad_frame"
        reply = await raw((64 * 1024 * 1024).to_bytes(4, "big"))
        assert reply["code"] == "frame_too_large"
        payload = msgpack.packb({"type": "teleport"})
        reply = await raw(len(payload).to_bytes(4, "big") + payload)
        assert reply["code"] == "bad_request" and "teleport" in reply["message"]
        payload = msgpack.packb(["not", "a", "map"])
        reply = await raw(len(payload).to_bytes(4, "big") + payload)
        assert reply["code"] == "bad_request"
        with pytest.raises(PeerUnreachable, match="cannot open"):
            await open_stream(host, info.peer_id, "/p2p-infer/forward/9.0.0")
        # a truncated frame: the peer drops that stream only
        stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
        await stream.write((100).to_bytes(4, "big") + b"\x81")
        await stream.close()
        # still serving
        stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
        assert (await request(stream, {"type": "ping"}))["type"] == "pong"
    assert target.alive()


def test_forged_record_is_ignored(swarm, tmp_path):
    ready = tmp_path / "forger.ready"
    proc = subprocess.Popen([sys.executable, str(TESTS / "forger.py"), swarm.bootstrap.addr, str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "forger never got ready"
            time.sleep(0.2)
        forger = json.loads(ready.read_text())
        assert forger["stored_remotely"] == 0  # honest DHT nodes refuse to store it
        result = swarm.cli("peers", "--json", "--log-level", "debug")
        listed = {p["peer_id"] for p in json.loads(result.stdout)["peers"]}
        assert forger["peer_id"] not in listed
        assert {p.peer_id for p in swarm.serving()} <= listed  # honest peers unaffected
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_sigkilled_peer_disappears_once_its_record_expires(swarm):
    victim = swarm.peers["peer4"]
    assert victim.peer_id in swarm.wait_discoverable(timeout=60)
    swarm.kill("peer4", signal.SIGKILL)
    killed = time.monotonic()
    swarm.wait_listing(lambda listed: victim.peer_id not in listed, TTL + 60,
                       lambda _: "killed peer still listed long after its record expired")
    assert time.monotonic() - killed < TTL + 60
    assert {p.peer_id for p in swarm.serving()} <= set(swarm.list_peers())  # and the CLI lists the others
