"""Layer choice for ``peer --serve MODEL`` (proto/coverage.py) on virtual directories, and the
peer that makes it: it reads the real directory after joining and serves the weakest span."""

import json

import pytest

from p2p_infer.errors import ConfigError, UnknownModel
from p2p_infer.ml.shards import ServeSpec
from p2p_infer.proto.coverage import Provider, choose_span, layer_coverage, parse_size
from p2p_infer.testing.harness import Swarm

MIB = 2**20
SIX = [7 * MIB] * 6  # minilm-l6-like: six layers of about 7 MiB, layer 0 stays with clients


def test_empty_network_takes_the_first_servable_layers():
    choice = choose_span(SIX, [], 3 * 7 * MIB)
    assert (choice.first, choice.last) == (1, 3)
    assert choice.span_bytes == 21 * MIB and "budget holds 3 layer(s)" in choice.reason


def test_takes_the_uncovered_gap():
    providers = [Provider("a", 1, 2, 10.0), Provider("b", 5, 5, 10.0)]
    assert (choose_span(SIX, providers, 2 * 7 * MIB).first, choose_span(SIX, providers, 2 * 7 * MIB).last) == (3, 4)


def test_throughput_weighs_coverage():
    # layers 1-2 served by one slow peer, 3-5 by two fast ones: a two-layer peer goes to 1-2
    providers = [Provider("slow", 1, 2, 1.0), Provider("f1", 3, 5, 50.0), Provider("f2", 3, 5, 50.0)]
    choice = choose_span(SIX, providers, 2 * 7 * MIB)
    assert (choice.first, choice.last) == (1, 2)
    assert choice.coverage == (0.0, 1.0, 1.0, 100.0, 100.0, 100.0)
    # the same layers served by many slow peers are still weaker than a few fast ones
    many_slow = [Provider(f"s{i}", 1, 2, 2.0) for i in range(5)] + [Provider("f", 3, 5, 50.0)]
    assert choose_span(SIX, many_slow, 2 * 7 * MIB).first == 1


def test_petals_rule_weakest_layer_first_then_the_next():
    # windows of 2: (1,2) sorted [0, 9], (2,3) [0, 3], (3,4) [3, 4], (4,5) [4, 9]: (2,3) has the same weakest, a weaker second
    cov = [Provider("x", 1, 1, 9.0), Provider("y", 3, 3, 3.0), Provider("z", 4, 4, 4.0), Provider("w", 5, 5, 9.0)]
    assert layer_coverage(6, cov) == [0.0, 9.0, 0.0, 3.0, 4.0, 9.0]
    choice = choose_span(SIX, cov, 2 * 7 * MIB)
    assert (choice.first, choice.last) == (2, 3)


def test_own_old_record_and_unmeasured_providers():
    providers = [Provider("me", 1, 3, 20.0), Provider("other", 4, 5, 0.0)]
    choice = choose_span(SIX, providers, 3 * 7 * MIB, exclude="me")  # a restart ignores its own record
    assert (choice.first, choice.last) == (1, 3)
    assert choice.coverage[4] == 1.0  # an unmeasured provider still counts


def test_budget_limits_the_span_and_uneven_layers():
    assert choose_span(SIX, [], 100 * MIB).last == 5  # all five servable layers fit
    uneven = [1, 10, 10, 2, 2, 2]
    choice = choose_span(uneven, [], 6)  # only layers 3-5 fit 6 bytes together
    assert (choice.first, choice.last) == (3, 5)
    with pytest.raises(ConfigError, match="holds no layer"):
        choose_span(SIX, [], MIB)


def test_parse_size_and_serve_spec():
    assert parse_size("512MB") == 512 * 10**6 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("4096") == 4096
    for bad in ("", "lots", "-1MB", "0", "12 parsecs"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert ServeSpec.parse("minilm-l6").auto and not ServeSpec.parse("minilm-l6:1-2").auto
    with pytest.raises(UnknownModel):
        ServeSpec.parse("nope")


@pytest.mark.slow
def test_peer_without_a_range_serves_where_coverage_is_weakest(tmp_path):
    with Swarm(tmp_path, record_ttl=30) as swarm:
        swarm.start_bootstrap()
        swarm.start_peer("fixed", ["minilm-l6:1-3"])
        swarm.wait_discoverable(timeout=90)
        # about 7 MiB per minilm layer: a 20 MB budget holds two layers; 4-5 are uncovered
        auto = swarm.start_peer("auto", ["minilm-l6"], extra_args=["--memory-budget", "20MB"])
        listed = swarm.wait_discoverable(timeout=90)
        shards = listed[auto.peer_id]["shards"]
        assert [(s["first"], s["last"]) for s in shards] == [(4, 5)], shards
        lines = [json.loads(line) for line in auto.log_file.read_text().splitlines() if line.startswith("{")]
        chose = [line for line in lines if line.get("event") == "chose layers to serve"]
        assert chose and chose[0]["first"] == 4 and chose[0]["last"] == 5 and "weakest" in chose[0]["why"]
        # with 1-3 and 4-5 both covered once, the next auto peer doubles the weakest again: 1-2 (lowest start)
        third = swarm.start_peer("auto2", ["minilm-l6"], extra_args=["--memory-budget", "20MB"])
        listed = swarm.wait_discoverable(timeout=90)
        assert len(listed[third.peer_id]["shards"]) == 1
