"""The sans-IO Kademlia lookup on its own: an in-memory network of routing tables, no clock
but the ``now`` handed in, nothing sent."""

import random

from p2p_infer.proto.kademlia import Lookup, PeerState, RoutingTable, bucket_index, node_id


def network(n: int, k: int = 8, seed: int = 1) -> dict[int, RoutingTable]:
    rng = random.Random(seed)
    ids = [rng.getrandbits(256) for _ in range(n)]
    tables = {i: RoutingTable(i, k) for i in ids}
    for table in tables.values():  # as after a join: the node's own neighbourhood, then anyone
        for other in sorted(ids, key=lambda j: j ^ table.local)[:k + 1] + rng.sample(ids, min(n, 200)):
            table.add(other)
    return tables


def run(lookup: Lookup, tables: dict[int, RoutingTable], dead: set[int] = frozenset(), now: float = 0.0) -> float:
    """Drive it: each ask answered 10 ms later (dead peers never answer)."""
    while not lookup.finished:
        asked = lookup.next(now)
        if not asked:
            if lookup.waiting == 0:
                break
            now = lookup.next_deadline()
            lookup.poll(now)
            continue
        now += 0.01
        for peer in asked:
            if peer not in dead:
                lookup.on_response(peer, tables[peer].closest(lookup.target, lookup.k), now)
    return now


def test_a_lookup_finds_the_true_closest_peers_in_few_hops():
    tables = network(1000)
    ids = sorted(tables)
    target = node_id("some shard key")
    start = ids[0]
    lookup = Lookup(target, tables[start].closest(target, 8), k=8, exclude=[start])
    run(lookup, tables)
    truth = sorted((i for i in ids if i != start), key=lambda i: i ^ target)[:8]
    assert lookup.finished and lookup.closest() == truth
    assert 1 <= lookup.hops <= 6 and lookup.contacted < 100


def test_at_most_alpha_in_flight_and_dead_peers_time_out():
    tables = network(500)
    target = node_id("x")
    start = next(iter(tables))
    seeds = tables[start].closest(target, 8)
    dead = set(seeds[:2])
    lookup = Lookup(target, seeds, k=8, alpha=3, timeout=3.0, exclude=[start])
    first = lookup.next(0.0)
    assert len(first) == 3 and lookup.next(0.0) == []  # alpha reached: nothing more until answers
    for peer in first:
        if peer not in dead:
            lookup.on_response(peer, tables[peer].closest(target, 8), 0.01)
    end = run(lookup, tables, dead, now=0.01)
    assert lookup.finished and not set(lookup.closest()) & dead
    assert all(lookup.peers[p].state is PeerState.FAILED for p in dead)
    assert end >= 3.0  # the dead seeds cost one timeout


def test_late_and_unsolicited_answers_change_nothing():
    lookup = Lookup(5, [1, 2], k=2, alpha=1, timeout=1.0)
    (asked,) = lookup.next(0.0)
    lookup.on_response(99, [7], 0.1)  # never asked
    assert 7 not in lookup.peers
    lookup.poll(2.0)
    assert lookup.peers[asked].state is PeerState.FAILED
    lookup.on_response(asked, [4], 2.1)  # after we gave up on it
    assert 4 not in lookup.peers


def test_routing_table_keeps_old_peers_when_a_bucket_is_full():
    table = RoutingTable(0, k=2)
    assert table.add(8) and table.add(9) and not table.add(10)  # one bucket (bit 3), full
    assert bucket_index(0, 8) == 3 and not table.add(0)
    table.remove(8)
    assert table.add(10) and table.closest(11, 2) == [10, 9]
