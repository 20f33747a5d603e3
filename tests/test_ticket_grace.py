"""A candidate slow to hand out its ticket costs a committee query the ticket grace, not the
ticket timeout, and its ticket, when it comes, serves the session's later queries (real
swarm: the slow peer is an honest member whose ticket replies come 2 s late)."""

from __future__ import annotations

import time

import pytest
import trio

from p2p_infer.ml.models import DigitsMLP, load_model
from p2p_infer.node.client import Client
from p2p_infer.proto.committee_round import TICKET_GRACE_MS, TICKET_TIMEOUT_MS
from p2p_infer.testing.adversaries import SLOW_TICKETS_S
from p2p_infer.testing.harness import Swarm

from .test_committee import ALL, start

pytestmark = pytest.mark.slow


async def test_a_slow_ticket_costs_the_grace_and_then_serves_later_queries(tmp_path):
    assert TICKET_GRACE_MS / 1000 < SLOW_TICKETS_S < TICKET_TIMEOUT_MS / 1000
    model = load_model("digits-mlp")
    x = DigitsMLP.dataset()[2][5].tolist()
    with Swarm(tmp_path) as swarm:
        start(swarm, {"h1": (ALL, ""), "h2": (ALL, ""), "h3": (ALL, ""), "slow": (ALL, "slow-tickets")})
        slow = swarm.peers["slow"].peer_id
        async with Client([swarm.bootstrap.addr], committee=3) as c:
            started = time.monotonic()
            first = await c.classify(x)
            took = time.monotonic() - started
            assert first.output["class"] == model.run_local(x)["class"]
            # drawn without the slow candidate: a grace after the others' tickets, not its 2 s
            assert took < SLOW_TICKETS_S - 0.5, took
            assert all(slow not in stage["verdicts"] for stage in first.stages)
            assert slow not in c.ticket_session.tickets
            with trio.fail_after(SLOW_TICKETS_S + 3):  # its ticket, once it comes, enters the session
                while slow not in c.ticket_session.tickets:
                    await trio.sleep(0.05)
            seen_slow = False
            for i in range(6):  # later queries rank it with the others, and wait for nobody
                started = time.monotonic()
                result = await c.classify(DigitsMLP.dataset()[2][i].tolist())
                assert time.monotonic() - started < SLOW_TICKETS_S - 0.5
                seen_slow = seen_slow or any(slow in stage["verdicts"] for stage in result.stages)
            assert seen_slow  # 4 candidates, 3 stages, 6 queries: it is drawn (fails with (1/4)^18)
            await first.judged
