"""Trials and throughput an attacker cannot game (issue 9), with no network: routing ranks
peers by what the client measured, not by what their records claim, and trial requests
have the shape distribution of live ones and are mixed into live traffic by the rng."""

import random
import re
from collections import Counter

import pytest

from p2p_infer.proto.plan import QueryPlan
from p2p_infer.proto.query import Done, QueryMachine, Record, SendHop
from p2p_infer.proto.routing import Server, ThroughputBook, plan_route
from p2p_infer.proto.trial import Admission, Admit, Provider, TrialTask

from .test_query_machine import START, run_layers, wire

N_LAYERS = 6  # layer 0 on the client, 1..5 remote
SESSION = re.compile(r"^[0-9a-f]{32}$")


# ---- throughput: measured, never claimed ----


def routes_won(claims: dict[str, float], book: ThroughputBook) -> str:
    speed = book.effective(claims)
    servers = [Server(peer, 1, 5, speed[peer], rtt_ms=1.0) for peer in claims]
    return plan_route(servers, 1, 5)[0].peer_id


def test_a_record_claiming_1e9_layers_per_second_does_not_win_routes_against_measured_peers():
    claims = {"liar": 1e9, "h1": 200.0, "h2": 180.0}
    book = ThroughputBook()
    untimed = book.effective(claims)
    assert untimed["liar"] == untimed["h1"] == 200.0  # untimed: capped at the median claim, so at best a tie
    for _ in range(5):  # the client timed everyone: liar as fast as h2 really is, h1 a little faster
        book.observe("liar", 5, 26.0, rtt_ms=1.0)
        book.observe("h1", 5, 21.0, rtt_ms=1.0)
        book.observe("h2", 5, 26.0, rtt_ms=1.0)
    assert book.effective(claims)["liar"] == pytest.approx(200.0)  # 5 layers in 25 ms of compute
    assert routes_won(claims, book) == "h1"
    assert routes_won({**claims, "liar": 1.0}, book) == "h1"  # its claim, high or low, changes nothing once timed


def test_an_untimed_peer_gets_at_most_the_median_of_the_timed_ones():
    book = ThroughputBook()
    for _ in range(3):
        book.observe("a", 1, 10.0)
        book.observe("b", 1, 20.0)
    speed = book.effective({"a": 5.0, "b": 5.0, "new-liar": 1e9, "new-slow": 10.0, "new-silent": 0.0})
    assert speed["a"] == pytest.approx(100.0) and speed["b"] == pytest.approx(50.0)
    assert speed["new-liar"] == pytest.approx(75.0) and speed["new-silent"] == pytest.approx(75.0)
    assert speed["new-slow"] == 10.0  # an honest "I am slow" still counts


def test_one_outlier_sample_moves_nothing():
    book = ThroughputBook()
    for elapsed in (10.0, 10.0, 10.0, 0.0001, 10.0):  # one reply faster than the network allows
        book.observe("p", 1, elapsed, rtt_ms=0.0)
    assert book.measured("p") == pytest.approx(100.0)


# ---- trials: shaped like live requests, timed by the rng ----


SERVERS = [Server("a", 1, 2, 100.0), Server("b", 3, 5, 100.0), Server("c", 1, 5, 10.0), Server("d", 0, 3, 100.0)]
PROVIDERS = [Provider(s.peer_id, s.first, s.last) for s in SERVERS]


def live_hops(seed: int) -> list[SendHop]:
    rng = random.Random(seed)
    # each query sees the servers in its own order of speed, as measurements change
    servers = [Server(s.peer_id, s.first, s.last, rng.uniform(10, 1000)) for s in SERVERS]
    m = QueryMachine(QueryPlan(checks=()), "toy", N_LAYERS, START, servers, rng)
    actions, sends = m.start(0.0), []
    while not isinstance(actions[-1], Done):
        [send] = [a for a in actions if isinstance(a, SendHop)]
        sends.append(send)
        actions = m.on_reply(send.request_id, run_layers(send.activation, send.first, send.last), 1.0)
    return sends


def trial_specs(seed: int, tokens: int = 12):
    admission = Admission(random.Random(seed), retrial=1.0, spread=0.5)
    first = admission.plan(PROVIDERS, remote_first=1, n_layers=N_LAYERS, tokens=tokens, gate_untried=False)
    for spec in first:
        admission.passed[spec.peer_id] = True
    return first + admission.plan(PROVIDERS, remote_first=1, n_layers=N_LAYERS, tokens=tokens, gate_untried=False)


def test_trial_requests_have_the_shapes_of_live_requests():
    live = [h for seed in range(30) for h in live_hops(seed)]
    trials = [t for seed in range(30) for t in trial_specs(seed)]
    live_ranges = Counter((h.peer_id, h.first, h.last) for h in live)
    trial_ranges = Counter((t.peer_id, t.first, t.last) for t in trials)
    assert set(trial_ranges) <= set(live_ranges)  # every trial asks for a range live routes send that peer
    assert {(p, f, last) for p, f, last in trial_ranges if last - f > 0}  # not one layer each
    assert all(t.tokens == 12 for t in trials)  # the live query's own length (the driver builds it)
    # a session id of the same form on every request of either kind; a trial's is its own
    assert all(SESSION.match(r.session) for r in [*live, *trials])
    assert len({t.session for t in trials}) == len(trials)
    per_query = {h.session for h in live_hops(0)}
    assert len(per_query) == 1  # a live query's hops share one session, as a cached session would


def test_the_driver_builds_sends_from_specs_that_look_like_live_hops():
    admission = Admission(random.Random(3))
    [spec, *_] = admission.plan(PROVIDERS, remote_first=1, n_layers=N_LAYERS, tokens=7, gate_untried=True)
    x = wire([0.5, 0.25])
    [send] = admission.start([TrialTask(spec.peer_id, spec.first, spec.last, x, run_layers(x, spec.first, spec.last),
                                        session=spec.session)], 0.0)
    live = live_hops(3)[0]
    assert (type(send), send.prove, send.mask, bool(send.session)) == (type(live), live.prove, live.mask, True)
    assert len(send.request_id) == len(live.request_id)


def test_trials_are_mixed_into_live_traffic_at_random_not_all_sent_before_it():
    admission = Admission(random.Random(7), retrial=0.5, spread=0.2)
    first = admission.plan(PROVIDERS, remote_first=1, n_layers=N_LAYERS, tokens=8, gate_untried=True)
    assert all(s.gating and s.delay == 0.0 for s in first)  # the query cannot route without them: wait
    for spec in first:
        admission.passed[spec.peer_id] = True
    later = [admission.plan(PROVIDERS, remote_first=1, n_layers=N_LAYERS, tokens=8, gate_untried=False) for _ in range(40)]
    counts = Counter(len(q) for q in later)
    assert len(counts) > 2  # how many trials a query carries is the rng's: none, some or all
    delays = [s.delay for q in later for s in q]
    assert not any(s.gating for q in later for s in q) and all(0.0 <= d <= 0.2 for d in delays)
    assert len(set(delays)) == len(delays) and max(delays) > 0.1  # spread over the query, not bunched at its start
    new_peer = [*PROVIDERS, Provider("new", 3, 5)]
    mixed = admission.plan(new_peer, remote_first=1, n_layers=N_LAYERS, tokens=8, gate_untried=False)
    assert [s for s in mixed if s.peer_id == "new"][0].delay > 0.0  # a newcomer need not hold a query up
    admission.on_query_done(1.0)
    assert admission.spread > 0.2


def test_a_peer_that_passed_its_trial_and_then_lies_is_caught_by_a_later_trial():
    """The lie-after-trial strategy: honest on the first request, wrong after. Trials keep
    coming at random among live traffic, so a wrong answer to one un-admits the peer."""
    admission = Admission(random.Random(1), retrial=1.0)
    x = wire([1.0, 2.0])
    task = TrialTask("liar", 3, 5, x, run_layers(x, 3, 5), session="s")
    [first] = admission.start([task], 0.0)
    assert admission.on_reply(first.request_id, run_layers(x, 3, 5), 0.1) == [Record("liar", False), Admit("liar")]
    assert [s.peer_id for s in admission.plan([Provider("liar", 3, 5)], remote_first=1, n_layers=N_LAYERS, tokens=0,
                                               gate_untried=False)] == ["liar"]
    [again] = admission.start([task], 1.0)
    assert admission.on_reply(again.request_id, wire([9.0, 9.0]), 1.1) == [Record("liar", True)]
    assert not admission.admitted("liar")
    assert admission.plan([Provider("liar", 3, 5)], remote_first=1, n_layers=N_LAYERS, tokens=0, gate_untried=True) == []


def test_critical_mode_trials_use_whole_shards_only():
    admission = Admission(random.Random(0))
    specs = admission.plan(PROVIDERS, remote_first=1, n_layers=N_LAYERS, tokens=0, gate_untried=True, whole_shards=True)
    assert sorted((s.peer_id, s.first, s.last) for s in specs) == [("a", 1, 2), ("b", 3, 5), ("c", 1, 5)]
