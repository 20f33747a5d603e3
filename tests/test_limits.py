"""Issue 10's defects, reproduced on real peer processes: memory held by partial frames,
idle connections, the connection limit, a flood against another client, malformed tensor
headers on the forward and committee protocols."""

import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

import msgpack
import pytest
import torch
import trio

from p2p_infer.clock import now_ms
from p2p_infer.errors import PeerUnreachable
from p2p_infer.ml.models import load_model
from p2p_infer.ml.tensors import activation_to_wire, encode_tensor
from p2p_infer.net.framing import read_message, request, write_message
from p2p_infer.identity import Identity
from p2p_infer.net.host import add_handler, dial, open_stream, parse_peer_addr
from p2p_infer.testing.population import committee_candidates, committee_client
from p2p_infer.proto.forward import ForwardRequest
from p2p_infer.proto.wire import COMMITTEE_PROTOCOL, FORWARD_PROTOCOL, RESULT_PROTOCOL
from p2p_infer.testing.harness import Swarm

from .conftest import TESTS, light_host
from .strangers import bare_connection, rss_mb

pytestmark = pytest.mark.slow
MIB = 1024 * 1024
IDLE = 3.0  # the digits peer's connection idle timeout in these tests
LIMIT = 150  # and its connection limit


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("limits"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        swarm.start_peer("digits", ["digits-mlp:1-3"], wait=False, env={
            "P2P_INFER_CONN_IDLE_TIMEOUT": str(IDLE), "P2P_INFER_MAX_CONNECTIONS": str(LIMIT),
            "P2P_INFER_BUILD_CIRCUITS": "0"})  # no ZK build competing for the CPU
        swarm.start_peer("minilm", ["minilm-l6:1-5"], wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=240)
        yield swarm


def _log_events(peer) -> list[dict]:
    events = []
    for line in peer.log_file.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def digits_request(first=1, last=3) -> dict:
    model = load_model("digits-mlp")
    act = model.embed([0.5] * 64)
    return ForwardRequest(model.model_id, first, last, *activation_to_wire(act)).to_wire()


async def served(host, addr: str, message: dict, protocol: str = FORWARD_PROTOCOL) -> dict:
    info = parse_peer_addr(addr)
    await dial(host, info)
    stream = await open_stream(host, info.peer_id, protocol)
    try:
        await write_message(stream, message)
        with trio.fail_after(20):
            return await read_message(stream)
    finally:
        await stream.close()


async def test_80_partial_8mib_frames_from_one_identity_hold_little_memory(swarm):
    peer = swarm.peers["digits"]
    pid, info = peer.info["pid"], parse_peer_addr(peer.addr)
    replies: Counter[str] = Counter()
    chunk = b"\0" * MIB
    async with light_host() as attacker, light_host() as honest:
        await dial(attacker, info)
        before = peak = rss_mb(pid)

        async def partial_frame() -> None:
            try:  # past 64 streams from one peer, even the stream is refused
                stream = await open_stream(attacker, info.peer_id, FORWARD_PROTOCOL)
            except PeerUnreachable:
                replies["stream refused"] += 1
                return

            async def send() -> None:
                try:
                    await stream.write((8 * MIB).to_bytes(4, "big"))
                    for i in range(8):  # 8 MiB - 1 bytes, then silence
                        await stream.write(chunk[: MIB - (i == 7)])
                except Exception:
                    pass  # refused: the peer reset the stream

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                try:
                    replies[(await read_message(stream, timeout=60)).get("code", "?")] += 1
                except Exception as exc:
                    replies[type(exc).__name__] += 1
                nursery.cancel_scope.cancel()

        with trio.move_on_after(12):
            async with trio.open_nursery() as nursery:
                for _ in range(80):
                    nursery.start_soon(partial_frame)
                await trio.sleep(2)
                for _ in range(40):  # the attack is under way: another client is still served, quickly
                    peak = max(peak, rss_mb(pid))
                    started = time.perf_counter()
                    assert (await served(honest, peer.addr, digits_request()))["type"] == "forward_result"
                    assert time.perf_counter() - started < 5
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
    # the peer's own account (the attacker does not always get to read a refusal before the reset)
    refused = [e for e in _log_events(peer) if e.get("code") == "overloaded" and e.get("event") in ("frame refused", "stream refused")]
    assert len(refused) >= 70, (len(refused), replies)  # refused at the header (or the stream), before any payload
    print(f"partial frames: peer RSS {before:.0f} MB -> peak {peak:.0f} MB, refused {len(refused)} of 80")
    assert peak - before < 100, (before, peak, replies)  # was +620 MB (7.8 MB per frame)
    assert peer.alive()


@pytest.mark.load_sensitive
async def test_idle_connections_are_closed_and_the_connection_limit_holds(swarm):
    peer = swarm.peers["digits"]
    async with light_host() as honest:
        before = (await served(honest, peer.addr, {"type": "ping"}))["connections"]
    async with trio.open_nursery() as nursery:
        conns = []
        for _ in range(200):  # 200 identities complete Noise and Yamux, then open nothing
            with trio.move_on_after(10):
                try:
                    conns.append(await bare_connection(nursery, peer.addr))
                except Exception:
                    pass  # refused at the connection limit
        await trio.sleep(0.5)
        open_now = sum(not c.event_shutting_down.is_set() for c in conns)
        assert open_now <= LIMIT, open_now  # past the limit they were refused at once
        await trio.sleep(IDLE + 2)  # the idle timeout, plus the sweep interval
        deadline = trio.current_time() + 20  # plus slack for a loaded box
        while (still_open := sum(not c.event_shutting_down.is_set() for c in conns)) > 0:
            assert trio.current_time() < deadline, still_open  # the strangers see theirs closed
            await trio.sleep(0.5)
        async with light_host() as honest:  # the slots are free again, and the peer holds none
            while (pong := await served(honest, peer.addr, {"type": "ping"}))["connections"] > before + 1:
                assert trio.current_time() < deadline, (pong, before)  # (+1: this client)
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()


BAD_TENSORS = [
    {"dtype": ["float32"], "shape": [1, 32], "data": b"\0" * 128},
    {"dtype": {"float32": 1}, "shape": [1, 32], "data": b"\0" * 128},
    {"dtype": "float32", "shape": [1, True], "data": b"\0" * 4},
    {"dtype": "float32", "shape": [True, 32], "data": b"\0" * 128},
    {"dtype": "float32", "shape": [[1], 32], "data": b"\0" * 128},
    {"dtype": "float32", "shape": [1, -32], "data": b""},
    {"dtype": "float32", "shape": [1, 32.0], "data": b"\0" * 128},
    {"dtype": "float32", "shape": "1,32", "data": b"\0" * 128},
    {"dtype": "float32", "shape": [], "data": b""},
    {"dtype": "float32", "shape": [1, 1, 1, 1, 32], "data": b"\0" * 128},
    {"dtype": "float32", "shape": [2**62, 2**62], "data": b""},
    {"dtype": "float32", "shape": [1, 32], "data": "text"},
    {"dtype": "float32", "shape": [1, 32], "data": b"\0" * 127},
    {"dtype": "float16", "shape": [1, 32], "data": b"\0" * 64},
    {"dtype": None, "shape": None, "data": None},
    {"dtype": "float32", "shape": [1, 32]},
    {"dtype": "float32", "shape": [1, 32], "data": b"\0" * 128, "extra": 1},
    {"dtype": "float32", "shape": [1, 32], "data": encode_tensor(torch.full((1, 32), float("nan")))["data"]},
    {"dtype": "float32", "shape": [1, 32], "data": encode_tensor(torch.full((1, 32), float("inf")))["data"]},
    [1, 32],
    "tensor",
    None,
]


async def test_every_malformed_tensor_header_gets_bad_tensor_on_forward_and_committee(swarm):
    peer = swarm.peers["digits"]
    model = load_model("digits-mlp")
    good = digits_request()
    candidates = committee_candidates(model.model_id).to_wire()  # well-formed; checked only after the tensors
    async with light_host(committee_client()) as host:  # the task's client: a stranger gets not_selected first
        for bad in BAD_TENSORS:
            for field in ("hidden", "mask"):
                if bad is None and field == "mask":
                    continue  # no mask is the digits model's normal input
                forward = await served(host, peer.addr, {**good, field: bad})
                committee = await served(host, peer.addr, {"type": "execute", "candidates": candidates, "hidden": good["hidden"],
                                                           "mask": None, field: bad}, COMMITTEE_PROTOCOL)
                for reply in (forward, committee):
                    assert reply.get("code") == "bad_tensor", (field, bad, reply)
        assert (await served(host, peer.addr, good))["type"] == "forward_result"


async def _latencies(host, addr: str, wire: dict, n: int) -> list[float]:
    info = parse_peer_addr(addr)
    await dial(host, info)
    stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
    out = []
    for _ in range(n):
        started = time.perf_counter()
        reply = await request(stream, wire, timeout=30)
        assert reply["type"] == "forward_result"
        out.append((time.perf_counter() - started) * 1000)
        await trio.sleep(0.05)
    return out


@pytest.mark.load_sensitive
async def test_a_flooding_client_does_not_starve_another(swarm, tmp_path):
    """40 concurrent T=256 requests from one client pushed another's 8-token requests from
    ~6 ms to 660 ms p50 with one global queue; here the median may grow at most 3x."""
    peer = swarm.peers["minilm"]
    model = load_model("minilm-l6")
    wire = ForwardRequest(model.model_id, 1, 5, *activation_to_wire(model.embed("a short query of eight"))).to_wire()
    ready = tmp_path / "flooding"
    async with light_host() as victim:
        await _latencies(victim, peer.addr, wire, 5)  # warm up
        baseline = await _latencies(victim, peer.addr, wire, 30)
        flooder = subprocess.Popen([sys.executable, str(TESTS / "flooder.py"), peer.addr, "1", "5", "40", "256", "60", str(ready)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
        try:
            with trio.fail_after(120):
                while not ready.exists():
                    assert flooder.poll() is None
                    await trio.sleep(0.1)
            await trio.sleep(2)  # the flood is at full strength
            flooded = await _latencies(victim, peer.addr, wire, 40)
        finally:
            flooder.kill()
            flooder.wait(10)
        await trio.sleep(3)  # the flood's queued work drains
        after = await _latencies(victim, peer.addr, wire, 30)  # the box's load drifts (other tenants): baseline on both sides
    before, during = (statistics.median(baseline) + statistics.median(after)) / 2, statistics.median(flooded)
    print(f"flood: victim median {statistics.median(baseline):.1f} / {statistics.median(after):.1f} ms (before / after) "
          f"-> {during:.1f} ms during ({during / before:.2f}x)")
    assert during <= 3 * before, (round(before, 1), round(during, 1))
    assert peer.alive()


async def test_a_peer_never_dials_addresses_named_in_a_request(swarm):
    """Route hops and reply addresses point at a listener of ours: the peer must not connect
    there; it reports the unverifiable hop back over the client's own connection."""
    peer = swarm.peers["digits"]
    dialled: list[object] = []
    results: list[dict] = []

    async def bait(stream: trio.SocketStream) -> None:
        dialled.append(stream)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, bait, 0)
        port = listeners[0].socket.getsockname()[1]
        stranger = Identity.generate().peer_id
        bait_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{stranger}"
        async with light_host() as client:
            async def on_result(message: dict) -> dict:
                results.append(message)
                return {"type": "ok"}

            add_handler(client, RESULT_PROTOCOL, on_result)
            route = [{"peer": stranger, "addrs": [bait_addr], "first": 3, "last": 3}]
            reply = await served(client, peer.addr, {**digits_request(1, 2), "route": route, "request_id": "r1",
                                                     "reply_to": str(client.get_id()), "reply_addrs": [bait_addr]})
            assert reply["type"] == "accepted"
            with trio.fail_after(30):
                while not results:
                    await trio.sleep(0.1)
            assert results[0]["type"] == "forward_failed" and results[0]["code"] == "unreachable", results
            assert results[0]["failed_peer"] == stranger
            # the last hop for a client it has no connection to: no dial to reply_addrs either
            reply = await served(client, peer.addr, {**digits_request(), "request_id": "r2", "reply_to": stranger,
                                                     "reply_addrs": [bait_addr]})
            assert reply["type"] == "accepted"
            await trio.sleep(2)
            too_many = {**digits_request(), "route": [{**route[0], "addrs": [bait_addr] * 9}], "reply_to": str(client.get_id())}
            assert (await served(client, peer.addr, too_many))["code"] == "bad_request"
        nursery.cancel_scope.cancel()
    assert dialled == []
