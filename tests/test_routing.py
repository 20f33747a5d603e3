import pytest

from p2p_infer.errors import NoRoute
from p2p_infer.proto.routing import Server, plan_route, route_cost_ms


def ids(route):
    return [(s.peer_id, s.first, s.last) for s in route]


def test_prefers_fewer_faster_hops():
    servers = [Server("a", 1, 2, 1000), Server("b", 3, 5, 1000), Server("slow", 1, 5, 50)]
    assert ids(plan_route(servers, 1, 5)) == [("a", 1, 2), ("b", 3, 5)]


def test_measured_rtt_changes_the_choice():
    servers = [Server("near", 1, 5, 1000, rtt_ms=1.0), Server("far", 1, 5, 1000, rtt_ms=200.0)]
    assert ids(plan_route(servers, 1, 5)) == [("near", 1, 5)]


def test_load_changes_the_choice():
    servers = [Server("busy", 1, 5, 100, load=3.0, rtt_ms=1), Server("idle", 1, 5, 100, load=0.0, rtt_ms=1)]
    assert ids(plan_route(servers, 1, 5)) == [("idle", 1, 5)]


def test_partial_ranges_are_used():
    servers = [Server("a", 0, 4, 1000), Server("b", 3, 5, 1000)]
    route = plan_route(servers, 1, 5)
    assert route[0].first == 1 and route[-1].last == 5
    assert all(r.server.first <= r.first <= r.last <= r.server.last for r in route)


def test_exclusion_reroutes():
    servers = [Server("a", 1, 2, 1000), Server("b", 3, 5, 1000), Server("b2", 3, 5, 500)]
    assert ids(plan_route(servers, 1, 5, exclude={"b"})) == [("a", 1, 2), ("b2", 3, 5)]


def test_reputation_threshold_and_weight():
    servers = [Server("bad", 1, 5, 1000), Server("good", 1, 5, 500)]
    rep = {"bad": 0.2, "good": 1.0}.get
    assert ids(plan_route(servers, 1, 5, reputation=rep, min_reputation=0.5)) == [("good", 1, 5)]
    assert ids(plan_route(servers, 1, 5, reputation=rep)) == [("good", 1, 5)]  # cost x5 for R=0.2


def test_no_route_names_the_missing_layer():
    servers = [Server("a", 1, 2, 1000), Server("b", 4, 5, 1000)]
    with pytest.raises(NoRoute, match="layer 3 of minilm-l6"):
        plan_route(servers, 1, 5, model_name="minilm-l6")


def test_cost_is_additive():
    route = plan_route([Server("a", 1, 2, 100, rtt_ms=2.0)], 1, 2)
    assert route_cost_ms(route) == pytest.approx(2.0 + 20.0)


def test_whole_shards_only_when_asked():
    servers = [Server("a", 1, 3, 1000), Server("b", 2, 3, 1000), Server("c", 1, 1, 10)]
    assert ids(plan_route(servers, 1, 3, whole_shards=True)) == [("a", 1, 3)]
    assert ids(plan_route([Server("b", 2, 3, 1000), Server("c", 1, 1, 10)], 1, 3, whole_shards=True)) == [("c", 1, 1), ("b", 2, 3)]
