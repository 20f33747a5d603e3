"""Verified generation (the default): every span re-executed by another provider before the
answer is final. A consistent liar on one span is caught and the answer equals the honest one."""

import pytest

from p2p_infer.ml.models import load_model
from p2p_infer.ml.smollm2 import generate_local
from p2p_infer.node.client import Client
from p2p_infer.proto.sampling import Sampling
from p2p_infer.testing.harness import Swarm

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, smol):
    with Swarm(tmp_path_factory.mktemp("genv"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        for name in ("a1", "a2"):
            swarm.start_peer(name, ["smollm2-135m:1-14"], wait=False)
        for name in ("b1", "b2"):
            swarm.start_peer(name, ["smollm2-135m:15-29"], wait=False)
        swarm.start_peer("liar", ["smollm2-135m:15-29"], extra_args=["--test-fault", "wrong-generation"], wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=400)
        swarm.wait_discoverable(timeout=120)
        yield swarm


async def generate(swarm, **options):
    async with Client([swarm.bootstrap.addr], trial=False, request_timeout=60) as c:
        pieces = [p async for p in c.generate(PROMPT, max_new_tokens=12, **options)]
    return pieces[-1].result, pieces


async def test_honest_route_is_verified(swarm, smol):
    expected = generate_local(smol, smol.prompt_ids(PROMPT), 12, Sampling())
    liar = swarm.peers["liar"].peer_id
    # route around the liar; the verifier of 15-29 is drawn from b2 and the liar: either way the answer stands
    result, _ = await generate(swarm, avoid=[liar, swarm.peers["b2"].peer_id])
    assert result.tokens == expected and result.verified and result.mode == "verified"
    assert all(span["agreed"] for span in result.verification["spans"])
    assert {c["peer"] for c in result.verification["caught"]} <= {liar}


async def test_a_consistent_liar_on_the_route_is_caught_and_the_answer_is_honest(swarm, smol):
    expected = generate_local(smol, smol.prompt_ids(PROMPT), 12, Sampling())
    liar = swarm.peers["liar"].peer_id
    honest_b = [swarm.peers["b1"].peer_id, swarm.peers["b2"].peer_id]
    result, pieces = await generate(swarm, avoid=honest_b)  # the first attempt routes 15-29 through the liar
    assert any(p.restart for p in pieces)  # what streamed first was void
    assert [c["peer"] for c in result.verification["caught"] if c["role"] == "route"] == [liar]
    assert result.tokens == expected and result.verified
    assert liar not in [h["peer"] for h in result.route]
