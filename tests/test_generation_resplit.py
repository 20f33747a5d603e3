"""Re-splitting a failed span: when the middle span's only whole provider dies mid-generation,
the span runs on two peers whose ranges cover it (11-15 and 16-20), each replayed in turn, and
the tokens equal the same weights generating in one process (separate peer processes, real
libp2p, forwarded decode)."""

import signal

import pytest

from p2p_infer.ml.models import load_model
from p2p_infer.ml.smollm2 import generate_local
from p2p_infer.node.client import Client
from p2p_infer.proto.sampling import Sampling
from p2p_infer.testing.harness import Swarm

pytestmark = pytest.mark.slow
PROMPT = "Write a haiku about the sea."


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("gen-resplit"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        for name, serve in (("first", "1-10"), ("mid", "11-20"), ("lo", "11-15"), ("hi", "16-20"), ("last", "21-29")):
            swarm.start_peer(name, [f"smollm2-135m:{serve}"], wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=400)
        swarm.wait_discoverable(timeout=120)
        yield swarm


@pytest.mark.parametrize("forwarding", [True], ids=["forwarded"])
async def test_killing_the_only_whole_provider_re_splits_its_span(swarm, forwarding):
    smol = load_model("smollm2-135m")
    expected = generate_local(smol, smol.prompt_ids(PROMPT), 24, Sampling())
    split = [swarm.peers["lo"].peer_id, swarm.peers["hi"].peer_id]
    pieces = []
    async with Client([swarm.bootstrap.addr], trial=False, request_timeout=60) as c:
        async for piece in c.generate(PROMPT, max_new_tokens=24, verified=False, avoid=split, forwarding=forwarding):
            pieces.append(piece)
            if piece.index == 6 and piece.result is None and swarm.peers["mid"].alive():
                assert piece.route[1] == swarm.peers["mid"].peer_id
                swarm.kill("mid", signal.SIGKILL)
    result = pieces[-1].result
    assert result.tokens == expected
    assert [f["peer"] for f in result.failovers] == [swarm.peers["mid"].peer_id]
    assert result.resplits == [{"first": 11, "last": 20, "parts": [(11, 15), (16, 20)]}]
    assert [(h["first"], h["last"], h["peer"]) for h in result.route[1:3]] == [(11, 15, split[0]), (16, 20, split[1])]
    assert result.forwarded_tokens >= len(expected) - 2  # forwarded again over the four hops after the replay
