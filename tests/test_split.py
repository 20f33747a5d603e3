"""Split inference end to end: peers in separate processes, a real client, real models."""

import signal
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import trio

from p2p_infer.node.client import Client
from p2p_infer.errors import NoRoute
from p2p_infer.proto.forward import ForwardRequest
from p2p_infer.proto.wire import FORWARD_PROTOCOL
from p2p_infer.net.framing import request, write_message
from p2p_infer.testing.harness import Swarm
from p2p_infer.net.host import dial, open_stream, parse_peer_addr
from p2p_infer.ml.models import Activation, DigitsMLP, load_model
from p2p_infer.ml.tensors import activation_to_wire, encode_tensor

from .conftest import light_host

pytestmark = pytest.mark.slow
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Decentralized inference splits a model across volunteers.",
    "a",
    "Zero-knowledge proofs let a client check what a peer computed without trusting it, "
    "and consensus among a committee catches peers that lie about their outputs.",
]


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dumps")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, dump_dir):
    with Swarm(tmp_path_factory.mktemp("split"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        # "first" is the only server of layers 1-2 and records every request it receives
        swarm.start_peer("first", ["minilm-l6:1-2"], env={"P2P_INFER_DUMP_DIR": str(dump_dir)}, wait=False)
        swarm.start_peer("middle", ["minilm-l6:3-4"], wait=False)
        swarm.start_peer("middle2", ["minilm-l6:3-4"], wait=False)
        swarm.start_peer("last", ["minilm-l6:5-5"], wait=False)
        swarm.start_peer("digits-a", ["digits-mlp:1-2"], wait=False)
        swarm.start_peer("digits-b", ["digits-mlp:3-3"], wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=240)
        swarm.wait_discoverable(timeout=90)
        yield swarm


def client(swarm, **kw) -> Client:
    return Client([swarm.bootstrap.addr], unverified=True, **kw)  # plain routing, asked for by name


@pytest.mark.parametrize("forwarding", [False, True])
async def test_minilm_split_equals_monolithic(swarm, forwarding):
    model = load_model("minilm-l6")
    async with client(swarm, forwarding=forwarding) as c:
        for text in TEXTS:
            result = await c.embed(text)
            local = model.run_local(text)["embedding"]
            diff = float(np.abs(np.array(result.output["embedding"]) - np.array(local)).max())
            assert diff <= 1e-5, (text, diff)
            assert [(h.first, h.last) for h in result.route][0][0] == 1
            assert result.route[-1].last == 5
            assert result.mode == ("forwarding" if forwarding else "client")
            assert result.failed_peers == []


async def test_client_keeps_more_layers_when_asked(swarm):
    model = load_model("minilm-l6")
    async with client(swarm, local_layers=3) as c:
        result = await c.embed(TEXTS[0])
        assert result.route[0].first == 3
        assert np.abs(np.array(result.output["embedding"]) - np.array(model.run_local(TEXTS[0])["embedding"])).max() <= 1e-5


async def test_digits_whole_test_split_matches_local(swarm):
    model = load_model("digits-mlp")
    _, _, x_test, _ = DigitsMLP.dataset()
    mismatches = 0
    async with client(swarm) as c:
        for x in x_test:
            result = await c.classify(x.tolist())
            mismatches += result.output["class"] != model.run_local(x.tolist())["class"]
    assert mismatches == 0 and len(x_test) == 450


async def test_no_text_or_token_ids_leave_the_client(swarm, dump_dir):
    secret = "my secret diagnosis is confidential"
    before = set(dump_dir.iterdir())
    async with client(swarm) as c:
        await c.embed(secret)
    dumps = [p for p in dump_dir.iterdir() if p not in before]
    assert dumps, "the recording peer saw no request"
    tokens = load_model("minilm-l6").tokenizer([secret])["input_ids"][0]
    lengths = []
    for path in dumps:
        raw = path.read_bytes()
        assert secret.encode() not in raw and b"secret" not in raw and b"diagnosis" not in raw
        msg = msgpack.unpackb(raw)
        assert set(msg) <= {"type", "model", "first", "last", "session", "request_id", "hidden", "mask", "route", "reply_to", "reply_addrs", "trace", "prove"}
        if msg["type"] != "forward":
            continue
        assert msg["hidden"]["dtype"] == "float32" and msg["hidden"]["shape"][2] == 384
        mask = np.frombuffer(msg["mask"]["data"], dtype="<i8")
        assert set(mask.tolist()) <= {0, 1}  # the only integers sent: no token ids
        lengths.append(len(mask))
        for field in ("session", "request_id", "reply_to"):
            assert secret not in str(msg.get(field, ""))
    assert len(tokens) in lengths  # the query itself (besides the client's random trial input)


async def raw_forward(host, peer_addr: str, wire: dict) -> dict:
    info = parse_peer_addr(peer_addr)
    await dial(host, info)
    stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
    try:
        await write_message(stream, wire)
        from p2p_infer.net.framing import read_message

        with trio.fail_after(20):
            return await read_message(stream)
    finally:
        await stream.close()


async def test_bad_forward_requests_get_clear_errors_and_the_peer_keeps_serving(swarm):
    model = load_model("minilm-l6")
    peer = swarm.peers["last"]
    act = model.embed("hello world")
    good = ForwardRequest(model.model_id, 5, 5, *activation_to_wire(act)).to_wire()

    def variant(**patch):
        return {**good, **patch}

    nan = act.hidden.clone()
    nan[0, 0, 0] = float("nan")
    cases = [
        (variant(model="00" * 32), "unknown_model"),
        (variant(first=3, last=4), "not_served"),
        (variant(hidden={**encode_tensor(act.hidden), "dtype": "int64"}), "bad_tensor"),
        (variant(hidden=encode_tensor(act.hidden[:, :, :100].contiguous())), "bad_tensor"),
        (variant(hidden=encode_tensor(nan)), "bad_tensor"),
        (variant(hidden={"dtype": "float32", "shape": [1, 100000, 384], "data": b""}), "bad_tensor"),
        (variant(mask=None), "bad_tensor"),
    ]
    async with light_host() as host:
        for wire, code in cases:
            reply = await raw_forward(host, peer.addr, wire)
            assert reply["type"] == "error" and reply["code"] == code, (code, reply)
            assert reply["message"]
        # clients that disconnect mid-request
        info = parse_peer_addr(peer.addr)
        ping_stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
        before = await request(ping_stream, {"type": "ping"})
        for _ in range(20):
            stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
            await write_message(stream, good)
            await stream.reset()
        # still serving, and correct
        reply = await raw_forward(host, peer.addr, good)
        assert reply["type"] == "forward_result"
        with trio.fail_after(30):
            while (after := await request(ping_stream, {"type": "ping"}))["in_flight"]:
                await trio.sleep(0.1)
        # abandoned requests finished and left no threads behind (the pool is bounded)
        assert after["threads"] <= before["threads"] + 4, (before, after)
    assert peer.alive()


async def test_unknown_model_in_the_client_is_a_clear_error(swarm):
    from p2p_infer.errors import UnknownModel

    async with client(swarm) as c:
        with pytest.raises(UnknownModel, match="unknown model"):
            await c.run("gpt-17", "hi")


async def test_killing_the_middle_peer_during_a_stream_of_queries(swarm):
    """Runs last in this module: it kills a peer."""
    model = load_model("minilm-l6")
    expected = {t: np.array(model.run_local(t)["embedding"]) for t in TEXTS}
    rerouted = 0
    async with client(swarm) as c:
        c.admission.retrial = 0.0  # a random re-trial could find the dead peer before a live hop does
        first = await c.embed(TEXTS[0])
        used = {h.peer for h in first.route if (h.first, h.last) == (3, 4)}
        victim = next(p for p in swarm.peers.values() if p.info and p.peer_id in used)
        for i in range(12):
            if i == 4:
                swarm.kill(victim.name, signal.SIGKILL)
            text = TEXTS[i % len(TEXTS)]
            result = await c.embed(text)
            assert np.abs(np.array(result.output["embedding"]) - expected[text]).max() <= 1e-5
            if i >= 4:
                assert victim.peer_id not in {h.peer for h in result.route}
            rerouted += bool(result.failed_peers)
        assert rerouted >= 1  # at least the first query after the kill re-routed
        # with no server left for layers 3-4 the error names them
        swarm.kill("middle2" if victim.name == "middle" else "middle", signal.SIGKILL)
        with pytest.raises(NoRoute, match="layer 3 of minilm-l6"):
            await c.embed("nobody serves the middle now")
