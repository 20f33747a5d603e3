"""Batched queries: one request per stage carrying B inputs, committees and certificates over
the whole batch, results equal to one-by-one queries, and peers that refuse batches past
their limits with a clear code (real peers in separate processes, real models)."""

import json

import msgpack
import numpy as np
import pytest
import torch
import trio

from p2p_infer.errors import BatchTooLarge, UnsupportedMode
from p2p_infer.ml.models import Activation, DigitsMLP, load_model
from p2p_infer.ml.shards import ServeSpec, ShardServer
from p2p_infer.ml.tensors import activation_to_wire, encode_tensor
from p2p_infer.net.framing import read_message, write_message
from p2p_infer.net.host import dial, open_stream, parse_peer_addr
from p2p_infer.node.client import Client
from p2p_infer.proto.forward import ForwardRequest
from p2p_infer.proto.tensors import DEFAULT_MAX_BATCH
from p2p_infer.proto.wire import FORWARD_PROTOCOL
from p2p_infer.testing.harness import Swarm

from .conftest import light_host

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Decentralized inference splits a model across volunteers, who serve contiguous ranges of layers.",
    "Zero-knowledge proofs",
    "Committees of peers check each other by commit and reveal.",
]
TOL = 1e-5


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dumps")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, dump_dir):
    with Swarm(tmp_path_factory.mktemp("batch"), record_ttl=30, extra_env={"P2P_INFER_DUMP_DIR": str(dump_dir)}) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([["minilm-l6:1-5", "digits-mlp:1-3"]] * 3, timeout=240)  # committees of 3 on every stage
        swarm.wait_discoverable(timeout=90)
        yield swarm


def local(texts):
    model = load_model("minilm-l6")
    return np.array([model.run_local(t)["embedding"] for t in texts], dtype=np.float32)


def forwards_since(dump_dir, before):
    msgs = [msgpack.unpackb(p.read_bytes()) for p in sorted(set(dump_dir.iterdir()) - before)]
    return [m for m in msgs if m.get("type") == "forward"]


@pytest.mark.slow
async def test_unverified_batch_is_one_request_per_stage_and_equals_one_by_one(swarm, dump_dir):
    async with Client([swarm.bootstrap.addr], unverified=True, trial=False) as c:
        one_by_one = np.array([(await c.embed(t)).numpy() for t in TEXTS])
        before = set(dump_dir.iterdir())
        batch = await c.embed(TEXTS)
    sent = forwards_since(dump_dir, before)
    assert len(sent) == len(batch.route)  # one request per stage, not one per input
    assert all(m["hidden"]["shape"][0] == len(TEXTS) for m in sent)
    assert batch.batch == len(TEXTS) and batch.numpy().shape == (len(TEXTS), 384)
    assert np.abs(batch.numpy() - one_by_one).max() <= TOL
    assert np.abs(batch.numpy() - local(TEXTS)).max() <= TOL


@pytest.mark.slow
async def test_committee_batch_is_verified_and_certified(swarm):
    async with Client([swarm.bootstrap.addr]) as c:  # verified by default: a committee of 3 per stage
        batch = await c.embed(TEXTS)
        single = await c.embed(TEXTS[2])
        certified = c.last_certified
    assert batch.verified and batch.mode.startswith("committee") and batch.certificate
    assert all(s["verified"] for s in batch.verification)
    assert np.abs(batch.numpy() - local(TEXTS)).max() <= TOL
    assert np.abs(batch.numpy()[2] - single.numpy()).max() <= TOL
    assert certified is not None


@pytest.mark.slow
def test_cli_batch_certificate_verifies_offline(swarm, tmp_path):
    cert, out = tmp_path / "q.cert", tmp_path / "q.out"
    proc = swarm.cli("query", "--json", "--save-cert", str(cert), "--save-output", str(out), *TEXTS[:3])
    result = json.loads(proc.stdout)
    assert result["batch"] == 3 and len(result["output"]["embedding"]) == 3 and result["verified"]
    assert np.abs(np.array(result["output"]["embedding"]) - local(TEXTS[:3])).max() <= TOL
    checked = swarm.cli("verify", str(cert), "--output", str(out))
    assert checked.returncode == 0 and "VALID" in checked.stdout.upper()


@pytest.mark.slow
async def test_digits_batch_classifies_like_one_by_one(swarm):
    model = load_model("digits-mlp")
    images = DigitsMLP.dataset()[2][:16]
    async with Client([swarm.bootstrap.addr], optimistic=0.5) as c:  # the optimistic check covers the batch too
        result = await c.classify(images.numpy())
        report = await result.check
    assert result.batch == 16 and result.numpy().shape == (16, 10)
    assert result.output["class"] == [model.run_local(x.tolist())["class"] for x in images]
    assert not report.get("mismatch")


async def raw_forward(host, peer_addr, wire):
    info = parse_peer_addr(peer_addr)
    await dial(host, info)
    stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
    try:
        await write_message(stream, wire)
        with trio.fail_after(30):
            return await read_message(stream)
    finally:
        await stream.close()


@pytest.mark.slow
async def test_peer_refuses_batches_past_its_limits_and_keeps_serving(swarm):
    model = load_model("minilm-l6")
    peer = next(iter(swarm.serving()))

    def request(act):
        return ForwardRequest(model.model_id, 1, 5, *activation_to_wire(act)).to_wire()

    too_many = Activation(torch.zeros(DEFAULT_MAX_BATCH + 1, 4, 384), torch.ones(DEFAULT_MAX_BATCH + 1, 4, dtype=torch.int64))
    too_big = Activation(torch.zeros(12, 256, 384), torch.ones(12, 256, dtype=torch.int64))  # 4.7 MB > the 4 MiB tensor limit
    fits = model.embed_batch(TEXTS)
    async with light_host() as host:
        reply = await raw_forward(host, peer.addr, request(too_many))
        assert reply["type"] == "error" and reply["code"] == "batch_too_large", reply
        assert f"limit of {DEFAULT_MAX_BATCH}" in reply["message"]
        reply = await raw_forward(host, peer.addr, request(too_big))
        assert reply["type"] == "error" and reply["code"] == "bad_tensor" and "byte limit" in reply["message"], reply
        reply = await raw_forward(host, peer.addr, request(fits))
        assert reply["type"] == "forward_result" and reply["hidden"]["shape"][0] == len(TEXTS)
    assert peer.alive()


async def test_client_refuses_a_batch_before_sending():
    c = Client(["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"], unverified=True)
    with pytest.raises(BatchTooLarge, match="1 to 32 inputs"):
        await c.embed(["x"] * (DEFAULT_MAX_BATCH + 1))
    with pytest.raises(BatchTooLarge, match="byte limit of one request"):
        await c.embed(["word " * 300] * 12)  # 12 x 256 tokens
    critical = Client(["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"], critical=True)
    with pytest.raises(UnsupportedMode, match="one input at a time"):
        await critical.classify([[0.0] * 64] * 2)


def test_shard_server_batch_limit_is_configurable():
    server = ShardServer([ServeSpec("digits-mlp", 1, 2)], max_batch=4)
    model = next(iter(server.models.values()))
    server.check(model.model_id, 1, 2, Activation(torch.zeros(4, 32)))
    with pytest.raises(BatchTooLarge, match="limit of 4"):
        server.check(model.model_id, 1, 2, Activation(torch.zeros(5, 32)))
    out, _ = server.compute(model, 1, 2, Activation(torch.rand(5, 32)))
    assert out.shape == (5, 32)
    row = server.compute(model, 1, 2, Activation(torch.ones(1, 32)))[0]
    batch = server.compute(model, 1, 2, Activation(torch.ones(3, 32)))[0]
    assert torch.allclose(batch, row.expand(3, 32), atol=TOL)
    assert encode_tensor(batch)["shape"] == [3, 32]


def test_batched_request_vector_byte_for_byte_and_its_verdicts():
    import importlib.util
    from pathlib import Path

    from p2p_infer.errors import BadTensor
    from p2p_infer.ml.tensors import activation_from_wire
    from p2p_infer.proto.forward import parse_forward_request

    here = Path(__file__).resolve().parents[1] / "protocols" / "test-vectors"
    vector = json.loads((here / "forward-batch.json").read_text())
    spec = importlib.util.spec_from_file_location("generate_forward_batch", here / "generate_forward_batch.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    hidden, mask, packed = gen.request()
    assert packed.hex() == vector["msgpack_hex"] and list(hidden.shape) == vector["hidden_shape"]
    req = parse_forward_request(msgpack.unpackb(bytes.fromhex(vector["msgpack_hex"])))
    assert (req.model_id, req.first, req.last) == (vector["model"], vector["first"], vector["last"])
    model = load_model("minilm-l6")
    model.check_activation(activation_from_wire(req.hidden, req.mask))  # "as is": accepted
    rows = DEFAULT_MAX_BATCH + 1
    big = Activation(torch.from_numpy(np.repeat(hidden[:1], rows, axis=0)), torch.ones(rows, 3, dtype=torch.int64))
    with pytest.raises(BatchTooLarge):
        model.check_activation(big)
    with pytest.raises(BadTensor):
        model.check_activation(Activation(torch.from_numpy(hidden), torch.from_numpy(mask[:1].copy())))
