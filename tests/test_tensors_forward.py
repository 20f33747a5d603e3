import math

import pytest
import torch

from p2p_infer.errors import BadTensor, NotServed, ProtocolViolation, UnknownModel
from p2p_infer.proto.forward import ForwardRequest, Hop, forward_reply, parse_forward_reply, parse_forward_request
from p2p_infer.ml.models import Activation, load_model
from p2p_infer.ml.shards import ServeSpec, ShardServer
from p2p_infer.ml.tensors import activation_from_wire, activation_to_wire, decode_tensor, encode_tensor


def test_tensor_round_trip_is_exact():
    t = torch.randn(1, 7, 384)
    assert torch.equal(decode_tensor(encode_tensor(t)), t)
    m = torch.ones(1, 7, dtype=torch.int64)
    assert torch.equal(decode_tensor(encode_tensor(m)), m)


@pytest.mark.parametrize(
    "obj,reason",
    [
        ({"dtype": "float64", "shape": [1], "data": b"\x00" * 8}, "not allowed"),
        ({"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 12}, "needs 16 bytes"),
        ({"dtype": "float32", "shape": [0], "data": b""}, "positive"),
        ({"dtype": "float32", "shape": [1, 1, 1, 1, 1], "data": b"\x00" * 4}, "1 to 4"),
        ({"dtype": "float32", "shape": [1 << 30], "data": b""}, "exceeds"),
        ({"dtype": "float32", "shape": [1], "data": "text"}, "bytes"),
        ({"dtype": "float32", "shape": [1]}, "exactly"),
        (b"pickle?", "map"),
    ],
)
def test_bad_tensors(obj, reason):
    with pytest.raises(BadTensor, match=reason):
        decode_tensor(obj)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(value):
    t = torch.zeros(1, 4)
    t[0, 2] = value
    with pytest.raises(BadTensor, match="NaN or infinite"):
        decode_tensor(encode_tensor(t))


def test_forward_request_round_trip():
    act = Activation(torch.randn(1, 32), None)
    req = ForwardRequest("ab" * 32, 1, 2, *activation_to_wire(act), session="s", request_id="r", route=[Hop("p", ("/ip4/1.2.3.4/tcp/1",), 3, 3)], reply_to="c")
    back = parse_forward_request(req.to_wire())
    assert torch.equal(activation_from_wire(back.hidden, back.mask).hidden, act.hidden) and back.route == req.route and back.reply_to == "c"
    hidden, timing = parse_forward_reply(forward_reply(encode_tensor(act.hidden), 1.5, 0.5, "r"))
    assert torch.equal(decode_tensor(hidden), act.hidden) and timing == {"compute_ms": 1.5, "queue_ms": 0.5}


@pytest.mark.parametrize(
    "patch,reason",
    [
        ({"type": "forwrd"}, "unknown message type"),
        ({"model": 5}, "model id"),
        ({"first": 3, "last": 1}, "first <= last"),
        ({"route": "x"}, "route"),
        ({"route": [{"peer": 1}]}, "hop"),
        ({"session": "s" * 1000}, "session"),
        ({"route": [{"peer": "p", "addrs": ["/ip4/1.2.3.4/tcp/1"] * 9, "first": 3, "last": 3}]}, "at most 8"),
        ({"route": [{"peer": "p", "addrs": ["/ip4/" + "1" * 300], "first": 3, "last": 3}]}, "hop"),
        ({"route": [{"peer": "p" * 200, "addrs": [], "first": 3, "last": 3}]}, "hop"),
        ({"reply_addrs": ["/ip4/1.2.3.4/tcp/1"] * 9}, "at most 8"),
        ({"reply_addrs": ["x" * 257]}, "256 characters"),
    ],
)
def test_malformed_forward_requests(patch, reason):
    wire = ForwardRequest("ab" * 32, 1, 2, encode_tensor(torch.randn(1, 32))).to_wire()
    wire.update(patch)
    with pytest.raises(ProtocolViolation, match=reason):
        parse_forward_request(wire)


@pytest.fixture(scope="module")
def digits_server():
    return ShardServer([ServeSpec.parse("digits-mlp:1-2")])


def test_shard_server_checks_model_range_and_shape(digits_server):
    model = load_model("digits-mlp")
    good = Activation(torch.randn(1, 32))
    assert digits_server.check(model.model_id, 1, 2, good) is model
    with pytest.raises(UnknownModel):
        digits_server.check("00" * 32, 1, 2, good)
    with pytest.raises(NotServed, match="serving 1-2"):
        digits_server.check(model.model_id, 2, 3, good)
    with pytest.raises(BadTensor, match=r"\[B, 32\]"):  # dimension 0 is the batch (protocols/forward.md, "Batches")
        digits_server.check(model.model_id, 1, 2, Activation(torch.randn(1, 31)))
    with pytest.raises(BadTensor, match="no attention mask"):
        digits_server.check(model.model_id, 1, 2, Activation(torch.randn(1, 32), torch.ones(1, 1, dtype=torch.int64)))


def test_shard_server_output_equals_local_layers(digits_server):
    model = load_model("digits-mlp")
    act = Activation(torch.randn(1, 32))
    out, ms = digits_server.compute(model, 1, 2, act)
    assert torch.equal(out, model.run_layers(act, 1, 2)) and ms >= 0


def test_serve_spec_parsing():
    assert ServeSpec.parse("minilm-l6:2-3") == ServeSpec("minilm-l6", 2, 3)
    assert ServeSpec.parse("minilm-l6:4") == ServeSpec("minilm-l6", 4, 4)
    with pytest.raises(UnknownModel):
        ServeSpec.parse("gpt5:1-2")
    assert ServeSpec.parse("minilm-l6").auto  # MODEL alone: the peer picks its layers (proto/coverage.py)
    with pytest.raises(Exception, match="MODEL:FIRST-LAST"):
        ServeSpec.parse("minilm-l6:x")


def test_serving_beyond_the_model_is_refused():
    with pytest.raises(Exception, match="layers 0-3"):
        ShardServer([ServeSpec.parse("digits-mlp:2-7")])
