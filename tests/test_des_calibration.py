"""The discrete-event model against the process engine on the same scenario at small N
(issue 13): simulations/calibrate.toml, 6 peers, 40 committee queries, on both engines.

Stated tolerance (docs/simulations.md, "Calibration"): the model's median query latency
within a factor of 2 of the processes' (per_message_ms = 8 was fitted on a quiet 2-core box:
74.45 ms measured in the clean-clone CI run, 73.6 ms modelled; at load ~17 the processes took
754 ms, so the test needs a quiet machine: marked load_sensitive, run by `make hardening`), the same route length, both >= 95% answered, neither
accepting a wrong result. Tails are not claimed: the processes' p95 comes from CPU
contention the model does not have.

Message counts (what the code sends, committee/5.0.0 and gossip topic v5): the light clients'
requests per query by type (loadgen counts them on the real client; the model counts its
own), the verdicts gossiped per query, and the rounds each peer receives per query (its audit
log's commits, against the model's round entries times (peers - 1) / peers: not its own): executes and verdicts equal, tickets once per
client session (a fraction of a request per query, not k per stage), rounds within 25%.
"""

from dataclasses import replace
from pathlib import Path

import pytest

from p2p_infer.sim.des.engine import DesRun
from p2p_infer.sim.report import summary
from p2p_infer.sim.runner import simulate
from p2p_infer.sim.scenario import load_scenario

SCENARIO = Path(__file__).parent.parent / "simulations" / "calibrate.toml"
FACTOR = 2.0


@pytest.mark.slow
@pytest.mark.load_sensitive
def test_the_model_matches_the_processes_within_the_stated_tolerance(tmp_path):
    processes = simulate(SCENARIO, tmp_path, progress=False, plots=False, check=False)
    model = summary(DesRun(replace(load_scenario(SCENARIO), engine="des"), progress=False).run())
    for report in (processes, model):
        assert report["success_rate"] >= 0.95 and report["wrong_accepted"] == 0
    assert model["route_length"] == processes["route_length"]
    ratio = model["latency_ms"]["p50"] / processes["latency_ms"]["p50"]
    assert 1 / FACTOR <= ratio <= FACTOR, (model["latency_ms"], processes["latency_ms"])

    sent_p, sent_m = processes["client_requests_per_query"], model["client_requests_per_query"]
    assert sent_p["execute"] == pytest.approx(sent_m["execute"], rel=0.05), (sent_p, sent_m)
    assert sent_p.get("ticket", 0) <= 0.5 and sent_m.get("ticket", 0) <= 0.5, (sent_p, sent_m)  # 6 candidates, once per session
    assert processes["client_published_per_query"]["verdicts"] == model["gossip"]["published_per_query"]["verdicts"] == 1.0
    # a peer's audit log holds the rounds gossip brought it: every round but its own (gossipsub does
    # not deliver a node's own messages), so (peers - 1) / peers of all the rounds published
    peers = load_scenario(SCENARIO).peers
    rounds_m = model["gossip"]["round_entries"] / model["queries_sent"] * (peers - 1) / peers
    assert processes["audit_log_entries_per_query"]["commit"] == pytest.approx(rounds_m, rel=0.25), (processes["audit_log_entries_per_query"], rounds_m)
