"""Query plans: the supported combinations pass, every refused one names itself (p2p_infer/proto/plan.py)."""

import pytest

from p2p_infer.errors import P2PInferError, UnsupportedMode
from p2p_infer.proto.plan import QueryPlan

SUPPORTED = [
    QueryPlan(),
    QueryPlan(checks=("spot-check",), spot_check=0.1),
    QueryPlan(checks=("spot-check",), spot_check=1.0),
    QueryPlan(checks=("committee",), committee_k=3),
    QueryPlan(checks=("committee",), committee_k=5),
    QueryPlan(checks=("zk",)),
    QueryPlan(checks=("zk",), proof_follows=True),
    QueryPlan(transport="forwarding", checks=()),
    QueryPlan(checks="none"),
    QueryPlan(checks=("tee",)),
    QueryPlan(checks=("tee", "committee"), committee_k=3),  # TEE-only committees
    QueryPlan(checks=("zk", "tee")),
    QueryPlan(privacy="threshold", checks=()),
    QueryPlan(privacy="threshold", checks=("tee",)),
    QueryPlan(checks=("optimistic",), optimistic=0.1),
    QueryPlan(checks=("optimistic",), optimistic=1.0),
]


@pytest.mark.parametrize("plan", SUPPORTED, ids=lambda p: p.describe())
def test_supported_plans_validate(plan):
    assert plan.validate() is plan


REFUSED = [
    (QueryPlan(transport="forwarding", checks=("zk",)), ["forwarding with zk", "--forwarding", "--mode critical"]),
    (QueryPlan(transport="forwarding", checks=("committee",), committee_k=3), ["forwarding with committee", "--committee K"]),
    (QueryPlan(transport="forwarding", checks=("spot-check",), spot_check=0.5), ["forwarding with spot-check"]),
    (QueryPlan(checks=("committee", "zk"), committee_k=3), ["committee with zk", "--committee K with --mode critical"]),
    (QueryPlan(checks=("zk", "committee"), committee_k=3), ["zk with committee", "--mode critical", "--committee K"]),
    (QueryPlan(checks=("spot-check", "zk"), spot_check=0.5), ["spot-check with zk"]),
    (QueryPlan(checks=("committee", "spot-check"), committee_k=3, spot_check=0.5), ["committee with spot-check"]),
    (QueryPlan(privacy="threshold", checks=("committee",), committee_k=3), ["threshold with committee", "--enhanced-privacy"]),
    (QueryPlan(privacy="threshold", transport="forwarding", checks=()), ["threshold with forwarding", "do not carry ciphertext"]),
    (QueryPlan(checks=("committee",), committee_k=0), ["committee of k=0", "K >= 3"]),
    (QueryPlan(checks=("committee",), committee_k=1), ["committee of k=1", "K >= 3"]),  # one key's word certifies nothing
    (QueryPlan(checks=("committee",), committee_k=2), ["committee of k=2", "K >= 3"]),
    (QueryPlan(checks=("committee",), committee_k=-2), ["committee of k=-2"]),
    (QueryPlan(checks=(), committee_k=3), ["committee size k=3 without check committee"]),
    (QueryPlan(transport="forwarding"), ["forwarding with committee", "--unverified"]),  # the default check is a committee
    (QueryPlan(checks=("optimistic", "committee"), optimistic=0.1), ["optimistic with committee"]),
    (QueryPlan(checks=("optimistic", "zk"), optimistic=0.1), ["optimistic with zk"]),
    (QueryPlan(checks=("spot-check", "optimistic"), optimistic=0.1, spot_check=0.1), ["spot-check with optimistic"]),
    (QueryPlan(transport="forwarding", checks=("optimistic",), optimistic=0.1), ["forwarding with optimistic"]),
    (QueryPlan(checks=("optimistic",), optimistic=0.0), ["optimistic probability 0.0", "(0, 1]"]),
    (QueryPlan(checks=("optimistic",), optimistic=1.5), ["optimistic probability 1.5"]),
    (QueryPlan(optimistic=0.5), ["optimistic probability 0.5 without check optimistic"]),
    (QueryPlan(checks=("spot-check",), spot_check=0.0), ["spot-check probability 0.0", "(0, 1]"]),
    (QueryPlan(checks=("spot-check",), spot_check=1.5), ["spot-check probability 1.5", "(0, 1]"]),
    (QueryPlan(checks=("spot-check",), spot_check=-0.1), ["spot-check probability -0.1"]),
    (QueryPlan(spot_check=0.2), ["spot-check probability 0.2 without check spot-check"]),
    (QueryPlan(proof_follows=True), ["proof_follows without zk", "--proof-follows", "--mode critical"]),
    (QueryPlan(local_layers=0), ["local_layers >= 1"]),
    (QueryPlan(max_retries=-1), ["max_retries=-1"]),
    (QueryPlan(max_reruns=-1), ["max_reruns=-1"]),
    (QueryPlan(transport="carrier-pigeon"), ["transport 'carrier-pigeon'"]),  # type: ignore[arg-type]
    (QueryPlan(checks=("vibes",)), ["check 'vibes'"]),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("plan,names", REFUSED, ids=lambda x: x.describe() if isinstance(x, QueryPlan) else "")
def test_refused_plans_name_the_combination(plan, names):
    with pytest.raises(UnsupportedMode) as info:
        plan.validate()
    message = info.value.message
    for name in names:
        assert name in message, (name, message)
    assert "\n" not in message and message.startswith("unsupported mode: ")
    assert info.value.code == "unsupported_mode" and isinstance(info.value, P2PInferError)


def test_verified_by_default():
    """No options at all is a committee of 3 per stage; no check must be asked for by name."""
    assert QueryPlan().checks == ("committee",) and QueryPlan().committee_k == 3
    assert QueryPlan.from_options().check == "committee" and QueryPlan.from_options().committee_k == 3
    assert QueryPlan.from_options(unverified=True).validate().check == "none"
    assert QueryPlan.from_options(unverified=True, forwarding=True).validate().transport == "forwarding"
    assert QueryPlan.from_options(optimistic=0.25).validate().stage_check() == "optimistic p=0.25"
    with pytest.raises(UnsupportedMode, match="unverified with committee"):
        QueryPlan.from_options(unverified=True, committee=3)
    with pytest.raises(UnsupportedMode, match="unverified with optimistic"):
        QueryPlan.from_options(unverified=True, optimistic=0.5)


def test_the_client_options_map_onto_a_plan():
    assert QueryPlan.from_options() == QueryPlan()
    assert QueryPlan.from_options(forwarding=True, unverified=True).transport == "forwarding"
    assert QueryPlan.from_options(committee=3).checks == ("committee",)
    assert QueryPlan.from_options(critical=True, proof_follows=True).check == "zk"
    assert QueryPlan.from_options(spot_check=0.3).spot_check == 0.3
    both = QueryPlan.from_options(committee=3, critical=True)
    with pytest.raises(UnsupportedMode, match="--committee K with --mode critical"):
        both.validate()
    with pytest.raises(UnsupportedMode, match="forwarding with zk"):
        QueryPlan.from_options(forwarding=True, critical=True).validate()


def test_checks_are_normalised():
    assert QueryPlan(checks="zk").checks == ("zk",)  # type: ignore[arg-type]
    assert QueryPlan(checks=("none", "zk", "zk")).checks == ("zk",)
    assert QueryPlan(checks=("none",)).check == "none"
