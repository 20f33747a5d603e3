"""The query state machine driven with no network and a virtual clock (p2p_infer/proto/query.py)."""

import random
import subprocess
import sys

import numpy as np
import pytest

from p2p_infer.errors import NoRoute, RemoteError, UnsupportedMode, UsageError
from p2p_infer.proto.plan import QueryPlan
from p2p_infer.proto.query import (
    Arbitrate,
    AwaitResult,
    Done,
    Failed,
    Forget,
    HopFailure,
    QueryMachine,
    Record,
    RefreshDirectory,
    SendForward,
    SendHop,
)
from p2p_infer.proto.routing import Server
from p2p_infer.proto.trial import Admission, Admit, TrialTask
from p2p_infer.errors import PeerUnreachable

N_LAYERS = 6  # layer 0 on the client, 1..5 remote


def wire(values) -> dict:
    a = np.asarray(values, dtype="<f4").reshape(1, -1)
    return {"dtype": "float32", "shape": list(a.shape), "data": a.tobytes()}


def values(w: dict) -> list[float]:
    return np.frombuffer(w["data"], dtype="<f4").tolist()


def run_layers(w: dict, first: int, last: int) -> dict:
    """The honest computation: each layer i adds i."""
    return wire([v + sum(range(first, last + 1)) for v in values(w)])


SERVERS = [Server("a", 1, 2, 100.0), Server("b", 3, 4, 100.0), Server("b2", 3, 4, 50.0), Server("c", 5, 5, 100.0)]
START = wire([0.0, 1.0])


def machine(plan=None, servers=SERVERS, seed=0, **kw) -> QueryMachine:
    return QueryMachine(plan or QueryPlan(checks=()), "toy", N_LAYERS, START, list(servers), random.Random(seed), **kw)


def only(actions, kind):
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def answer(m: QueryMachine, send: SendHop, now: float, output=None) -> list:
    return m.on_reply(send.request_id, output or run_layers(send.activation, send.first, send.last), now,
                      timing={"compute_ms": 1.0})


def test_hop_by_hop_runs_the_cheapest_route_and_finishes():
    m = machine()
    actions, now, sent = m.start(0.0), 0.0, []
    while not isinstance(actions[-1], Done):
        send = only(actions, SendHop)
        sent.append((send.peer_id, send.first, send.last))
        now += 0.01
        actions = answer(m, send, now)
    done = actions[-1]
    assert sent == [("a", 1, 2), ("b", 3, 4), ("c", 5, 5)]
    assert values(done.output) == values(run_layers(START, 1, 5))
    assert [(h.peer_id, h.first, h.last) for h in done.hops] == sent and done.mode == "client" and done.failed == ()
    assert all(abs(h.round_trip_ms - 10.0) < 1e-6 for h in done.hops)


def test_failover_mid_route_replays_the_last_good_activation_and_excludes_the_peer():
    m = machine()
    first = only(m.start(0.0), SendHop)
    middle = only(answer(m, first, 0.1), SendHop)
    assert middle.peer_id == "b"
    good = middle.activation
    actions = m.on_failure(middle.request_id, HopFailure.from_error(PeerUnreachable("b: reset")), 0.2)
    assert Forget("b") in actions and not any(isinstance(a, Record) for a in actions)  # unreachable is no fault
    retry = only(actions, SendHop)
    assert (retry.peer_id, retry.first, retry.last) == ("b2", 3, 4)
    assert retry.activation == good  # replayed from the last good activation, not from the start
    last = only(answer(m, retry, 0.3), SendHop)
    done = only(answer(m, last, 0.4), Done)
    assert done.failed == ("b",) and "b" not in {h.peer_id for h in done.hops}
    assert values(done.output) == values(run_layers(START, 1, 5))


def test_a_peer_that_falls_under_the_trust_threshold_mid_query_is_skipped():
    scores = {"b": 1.0}
    m = machine(reputation=lambda peer: scores.get(peer, 1.0), min_reputation=0.5)
    first = only(m.start(0.0), SendHop)
    scores["b"] = 0.4  # e.g. a spot check elsewhere caught it
    assert only(answer(m, first, 0.1), SendHop).peer_id == "b2"


def test_a_wrong_answer_is_penalised_and_routed_around():
    m = machine()
    first = only(m.start(0.0), SendHop)
    middle = only(answer(m, first, 0.1), SendHop)
    actions = m.on_failure(middle.request_id, HopFailure.wrong_answer(ValueError("bad shape")), 0.2)
    assert Record("b", fault=True) in actions and only(actions, SendHop).peer_id == "b2"


def test_retries_are_bounded_then_no_route_names_the_model():
    servers = [Server("a", 1, 2, 100.0)] + [Server(f"m{i}", 3, 4, 100.0) for i in range(5)] + [Server("c", 5, 5, 100.0)]
    m = machine(QueryPlan(checks=(), max_retries=2), servers)
    send = only(answer(m, only(m.start(0.0), SendHop), 0.1), SendHop)
    for attempt in range(3):
        actions = m.on_failure(send.request_id, HopFailure.from_error(PeerUnreachable("gone")), 1.0 + attempt)
        if attempt < 2:
            send = only(actions, SendHop)
    failed = only(actions, Failed)
    assert isinstance(failed.error, NoRoute) and "toy" in failed.error.message and "3 failed hops" in failed.error.message
    assert m.on_reply(send.request_id, START, 9.0) == []  # finished: late replies are ignored


def test_no_route_refreshes_the_directory_once_then_names_the_missing_layer():
    m = machine(servers=[Server("a", 1, 2, 100.0), Server("c", 5, 5, 100.0)])
    assert m.start(0.0) == [RefreshDirectory()]
    recovered = machine(servers=[Server("a", 1, 2, 100.0)])
    assert recovered.start(0.0) == [RefreshDirectory()]
    assert only(recovered.on_servers(SERVERS, 0.5), SendHop).peer_id == "a"  # a replacement joined
    failed = only(m.on_servers([Server("a", 1, 2, 100.0)], 0.5), Failed)
    assert isinstance(failed.error, NoRoute) and "layer 3 of toy" in failed.error.message


def test_a_refusal_that_would_fail_anywhere_ends_the_query_with_that_error():
    m = machine()
    send = only(m.start(0.0), SendHop)
    refusal = RemoteError("bad_tensor", "hidden has the wrong shape", "a")
    failed = only(m.on_failure(send.request_id, HopFailure.from_error(refusal), 0.1), Failed)
    assert failed.error is refusal and m.failed == []
    m = machine()
    send = only(m.start(0.0), SendHop)
    overloaded = RemoteError("overloaded", "queue full", "a")  # another provider may take it
    assert isinstance(m.on_failure(send.request_id, HopFailure.from_error(overloaded), 0.1)[-1], (SendHop, RefreshDirectory, Failed))
    assert m.failed == ["a"]


def test_a_deadline_expires_on_virtual_time():
    m = machine(timeout=5.0)
    send = only(m.start(100.0), SendHop)
    assert send.deadline == 105.0 and m.next_deadline() == 105.0
    assert m.poll(104.9) == []
    actions = m.poll(105.0)
    assert Forget("a") in actions and m.failed == ["a"]
    assert actions[-1] == RefreshDirectory()  # "a" was the only server of layers 1-2
    failed = only(m.on_servers(SERVERS, 105.5), Failed)
    assert "layer 1 of toy" in failed.error.message


def test_forwarding_sends_the_whole_route_once():
    m = machine(QueryPlan(transport="forwarding", checks=()), timeout=5.0)
    fwd = only(m.start(0.0), SendForward)
    assert [(s.peer_id, s.first, s.last) for s in fwd.route] == [("a", 1, 2), ("b", 3, 4), ("c", 5, 5)]
    assert fwd.reply_from == "c" and fwd.activation == START
    assert only(m.on_accepted(fwd.request_id, 1.0), AwaitResult).deadline == 6.0
    trace = [{"peer": p, "first": f, "last": l, "compute_ms": 2.0} for p, f, l in (("a", 1, 2), ("b", 3, 4), ("c", 5, 5))]
    done = only(m.on_reply(fwd.request_id, run_layers(START, 1, 5), 2.0, trace=trace), Done)
    assert done.mode == "forwarding" and [h.peer_id for h in done.hops] == ["a", "b", "c"]


def test_forwarding_failure_falls_back_to_hop_by_hop_without_the_failed_peer():
    m = machine(QueryPlan(transport="forwarding", checks=()))
    fwd = only(m.start(0.0), SendForward)
    m.on_accepted(fwd.request_id, 0.1)
    actions = m.on_failure(fwd.request_id, HopFailure("b: internal: boom", peer="b"), 0.5)
    first = only(actions, SendHop)
    assert Forget("b") in actions and first.activation == START and (first.first, first.last) == (1, 2)
    middle = only(answer(m, first, 0.6), SendHop)
    assert middle.peer_id == "b2"
    done = only(answer(m, only(answer(m, middle, 0.7), SendHop), 0.8), Done)
    assert done.mode == "client (after forwarding failed)" and done.failed == ("b",)


def test_a_forwarded_result_that_never_comes_falls_back_on_virtual_time():
    m = machine(QueryPlan(transport="forwarding", checks=()), timeout=5.0)
    fwd = only(m.start(0.0), SendForward)
    deadline = only(m.on_accepted(fwd.request_id, 1.0), AwaitResult).deadline
    assert m.poll(deadline - 0.001) == []
    hop = only(m.poll(deadline), SendHop)
    assert hop.activation == START and m.failed == []  # nobody to blame
    assert m.on_reply(fwd.request_id, START, deadline + 1) == []  # the late result is ignored


def spot_checked(seed=1) -> tuple[QueryMachine, SendHop, SendHop]:
    m = machine(QueryPlan(checks=("spot-check",), spot_check=1.0), seed=seed)
    first = only(m.start(0.0), SendHop)
    primary = only(answer(m, first, 0.1), SendHop)
    check = only(answer(m, primary, 0.2), SendHop)
    assert check.purpose == "check" and check.activation == primary.activation
    assert {primary.peer_id, check.peer_id} == {"b", "b2"}
    return m, primary, check


def test_spot_check_agreement_rewards_both():
    m, primary, check = spot_checked()
    actions = answer(m, check, 0.3)
    assert Record(primary.peer_id, False) in actions and Record(check.peer_id, False) in actions
    last = only(actions, SendHop)
    assert (last.first, last.last) == (5, 5)
    assert last.activation == run_layers(primary.activation, 3, 4)


def test_spot_check_disagreement_is_settled_by_the_clients_weights():
    m, primary, check = spot_checked()
    lie = wire([42.0, 42.0])
    actions = answer(m, check, 0.3, output=lie)
    arbitrate = only(actions, Arbitrate)
    assert (arbitrate.first, arbitrate.last) == (3, 4) and arbitrate.activation == primary.activation
    truth = run_layers(arbitrate.activation, 3, 4)
    actions = m.on_arbitration(truth, 0.4)
    assert Record(check.peer_id, fault=True) in actions and Record(primary.peer_id, fault=False) in actions
    assert only(actions, SendHop).activation == truth  # the truth goes on, not the lie
    done = only(answer(m, only(actions, SendHop), 0.5), Done)
    [report] = done.spot_checks
    assert report["outcome"] == "disagree" and report["wrong"] == [check.peer_id] and report["checker"] == check.peer_id


def test_an_unavailable_checker_keeps_the_primary_answer():
    m, primary, check = spot_checked()
    actions = m.on_failure(check.request_id, HopFailure.from_error(PeerUnreachable("gone")), 0.3)
    assert only(actions, SendHop).activation == run_layers(primary.activation, 3, 4)
    assert not any(isinstance(a, (Record, Forget)) for a in actions)


def test_spot_checks_follow_the_rng():
    chosen = set()
    for seed in range(20):
        m = machine(QueryPlan(checks=("spot-check",), spot_check=0.5), seed=seed)
        primary = only(answer(m, only(m.start(0.0), SendHop), 0.1), SendHop)
        chosen.add(only(answer(m, primary, 0.2), SendHop).purpose)
    assert chosen == {"hop", "check"}  # sometimes checked, sometimes not: the rng passed in decides


def test_zk_asks_for_proofs_and_returns_them_in_route_order():
    m = machine(QueryPlan(checks=("zk",), proof_follows=True))
    actions, hop = m.start(0.0), 0
    while not isinstance(actions[-1], Done):
        send = only(actions, SendHop)
        assert send.prove == "follow"
        hop += 1
        actions = m.on_reply(send.request_id, run_layers(send.activation, send.first, send.last), hop, evidence=f"token{hop}")
    assert actions[-1].evidence == ("token1", "token2", "token3") and actions[-1].mode == "critical"


def test_a_machine_refuses_an_unsupported_plan_before_sending():
    with pytest.raises(UnsupportedMode, match="forwarding with zk"):
        machine(QueryPlan(transport="forwarding", checks=("zk",)))
    with pytest.raises(UnsupportedMode, match="committee"):
        machine(QueryPlan(checks=("committee",), committee_k=3))  # committees have their own driver
    with pytest.raises(UsageError, match="keeps 6 locally"):
        machine(QueryPlan(checks=(), local_layers=6))


def trial_tasks() -> list[TrialTask]:
    x = wire([0.5, 0.25])
    return [TrialTask(peer, 3, 3, x, run_layers(x, 3, 3), session=f"s-{peer}") for peer in ("honest", "liar", "silent")]


def test_trials_admit_the_honest_penalise_the_liar_and_do_not_judge_the_silent():
    admission = Admission(random.Random(0), timeout=5.0)
    assert admission.untried([("honest", 3), ("liar", 3), ("silent", 3)]) == {"honest": 3, "liar": 3, "silent": 3}
    sends = {s.peer_id: s for s in admission.start(trial_tasks(), 0.0)}
    assert {s.purpose for s in sends.values()} == {"trial"} and all((s.first, s.last) == (3, 3) for s in sends.values())
    assert {s.session for s in sends.values()} == {"s-honest", "s-liar", "s-silent"}
    assert admission.on_reply(sends["honest"].request_id, run_layers(sends["honest"].activation, 3, 3), 0.1) == [
        Record("honest", False), Admit("honest")]
    assert admission.on_reply(sends["liar"].request_id, wire([9.0, 9.0]), 0.1) == [Record("liar", True)]
    assert admission.busy and admission.poll(4.9) == [] and admission.busy
    assert admission.poll(5.0) == [] and not admission.busy  # expired on virtual time: no verdict
    assert admission.admitted("honest") and not admission.admitted("liar") and not admission.admitted("silent")
    assert admission.untried([("honest", 3), ("liar", 3), ("silent", 3)]) == {"silent": 3}  # tried again later


def test_the_protocol_core_imports_neither_trio_libp2p_torch_nor_ezkl():
    code = ("import sys, p2p_infer.proto.query, p2p_infer.proto.plan, p2p_infer.proto.trial; "
            "bad = {'trio', 'libp2p', 'torch', 'ezkl'} & {m.split('.')[0] for m in sys.modules}; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
