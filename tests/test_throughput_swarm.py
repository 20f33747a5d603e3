"""Issue 9's throughput liar across real processes: a peer that advertises 1e9 layers/s (it
is an ordinary peer, 50 ms slower per reply) and lies after each client's first request.
Routing ranks peers by what the client timed, so the liar is not preferred; and once it has
passed a client's trial, that client's verification (a spot check) still catches it."""

import pytest

from p2p_infer.ml.models import load_model
from p2p_infer.node.client import Client
from p2p_infer.testing.harness import Swarm

pytestmark = pytest.mark.slow
SERVE = ["minilm-l6:1-5"]
TEXTS = ["the cat sat on the mat", "a peer to peer network", "verification by default", "cheap enough",
         "what a single peer can hide"]


async def test_a_peer_claiming_1e9_layers_per_second_is_not_preferred_and_is_caught_when_checked(tmp_path):
    model = load_model("minilm-l6")
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        for name, extra in (("h1", []), ("h2", []), ("liar", ["--test-fault", "claims-fast"])):
            swarm.start_peer(name, SERVE, extra_args=extra, wait=False)
        swarm.wait_ready([swarm.peers[n] for n in ("h1", "h2", "liar")], timeout=240)
        listed = swarm.wait_discoverable(timeout=120)
        liar = swarm.peers["liar"].peer_id
        assert listed[liar]["throughput"] == 1e9  # its record says so
        async with Client([swarm.bootstrap.addr], unverified=True) as c:
            routes = [[h.peer for h in (await c.embed(text)).route] for text in TEXTS]
            assert all(liar not in route for route in routes), routes
            timed = {name: c.throughput.measured(swarm.peers[name].peer_id) for name in ("h1", "h2", "liar")}
            assert timed["liar"] is not None and timed["liar"] < min(timed["h1"], timed["h2"]), timed
        # a second client, with verification and without later trials: the liar passes its
        # first-contact trial, is the only other provider once h2 is gone, and lies when it checks
        swarm.kill("h2")
        async with Client([swarm.bootstrap.addr], spot_check=1.0, request_timeout=10.0) as c:
            c.admission.retrial = 0.0  # so that what catches it is the verification, not a later trial
            result = await c.embed(TEXTS[0])
            wrong = [peer for check in result.spot_checks for peer in check.get("wrong", [])]
            assert wrong == [liar], result.spot_checks
            assert result.output["embedding"] == pytest.approx(model.run_local(TEXTS[0])["embedding"], abs=1e-5)
            assert c.reputation.of(liar) < 1.0
