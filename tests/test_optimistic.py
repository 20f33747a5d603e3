"""Optimistic mode's sans-IO parts (p2p_infer/proto/optimistic.py): the signed forward
commitment and its test vector, the evidence and what it refuses, the check machine, and
the detection probability 1-(1-p*q)^n checked against many simulated tasks."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from p2p_infer.errors import BadCommitment, ConsensusError, ProtocolViolation
from p2p_infer.identity import Identity
from p2p_infer.proto.forward import ForwardRequest, forward_reply, parse_commitment, parse_forward_request
from p2p_infer.proto.optimistic import (
    CommitRequest,
    ForwardCommitment,
    OptimisticCheck,
    OptimisticEvidence,
    Penalise,
    ReExecute,
    StageRun,
    detection_probability,
    input_digest,
    sign_commitment,
    tasks_to_detect,
)
from p2p_infer.proto.tensors import array_to_wire

VECTOR = Path(__file__).parent.parent / "protocols" / "test-vectors" / "forward-commitment.json"
MODEL = "f4824c9e60a9654844afb72cd9c0c8e6a9b3739e3f0e11ba507f61518d428823"
KEYS = {name: Identity.from_seed(bytes([i + 1]) * 32) for i, name in enumerate(("executor", "checker", "settler", "other"))}
HIDDEN = array_to_wire(np.arange(8, dtype=np.float32).reshape(1, 8))
TRUE = array_to_wire(np.full((1, 8), 0.25, dtype=np.float32))
LIE = array_to_wire(np.full((1, 8), 0.75, dtype=np.float32))
IN = input_digest(HIDDEN, None)
REQ = CommitRequest(bytes(range(32)), bytes(range(16)))


def signed(name: str, output, request: CommitRequest = REQ) -> ForwardCommitment:
    return sign_commitment(KEYS[name], MODEL, 1, 2, IN, output, request)


def run(output, name: str = "executor") -> StageRun:
    return StageRun(1, 2, HIDDEN, None, output, signed(name, output))


# ---- the commitment ----


def test_a_commitment_binds_every_field_and_its_signer():
    c = signed("executor", TRUE)
    c.check(executor=KEYS["executor"].peer_id, model_id=MODEL, first=1, last=2, input_digest=IN, output=TRUE, request=REQ)
    assert ForwardCommitment.from_wire(c.to_wire()) == c
    bad = [dict(executor=KEYS["checker"].peer_id), dict(model_id="0" * 64), dict(first=2), dict(last=3),
           dict(input_digest=input_digest(TRUE, None)), dict(output=LIE), dict(request=CommitRequest(bytes(32), REQ.nonce)),
           dict(request=CommitRequest(REQ.task_id, bytes(16)))]
    base = dict(executor=KEYS["executor"].peer_id, model_id=MODEL, first=1, last=2, input_digest=IN, output=TRUE, request=REQ)
    for change in bad:
        with pytest.raises(BadCommitment):
            c.check(**{**base, **change})
    forged = ForwardCommitment(*c.to_wire()[:9], signature=KEYS["checker"].sign(c.digest()))
    with pytest.raises(BadCommitment, match="bad signature"):
        forged.check(**base)
    for raw in (None, [], c.to_wire()[:9], [*c.to_wire()[:3], "1", *c.to_wire()[4:]]):
        with pytest.raises(BadCommitment):
            ForwardCommitment.from_wire(raw)


def test_the_forward_codec_carries_commit_and_commitment():
    request = ForwardRequest(MODEL, 1, 2, HIDDEN, commit=REQ).to_wire()
    assert parse_forward_request(request).commit == REQ
    plain = ForwardRequest(MODEL, 1, 2, HIDDEN).to_wire()
    assert "commit" not in plain and parse_forward_request(plain).commit is None  # plain requests unchanged
    with pytest.raises(ProtocolViolation, match="commit"):
        parse_forward_request({**request, "commit": {"task": b"short", "nonce": REQ.nonce}})
    reply = forward_reply(TRUE, 1.0, 0.0, "r", signed("executor", TRUE))
    assert parse_commitment(reply) == signed("executor", TRUE)
    with pytest.raises(BadCommitment, match="no 'commitment'"):
        parse_commitment(forward_reply(TRUE, 1.0, 0.0, "r"))


def test_the_commitment_vector_byte_for_byte():
    """protocols/test-vectors/forward-commitment.json, rebuilt from its fields."""
    v = json.loads(VECTOR.read_text())
    ident = Identity.from_seed(bytes.fromhex(v["seed_hex"]))
    hidden = {"dtype": "float32", "shape": v["hidden_shape"], "data": bytes.fromhex(v["hidden_data_hex"])}
    output = {"dtype": "float32", "shape": v["output_shape"], "data": bytes.fromhex(v["output_data_hex"])}
    request = CommitRequest(bytes.fromhex(v["task_hex"]), bytes.fromhex(v["nonce_hex"]))
    c = sign_commitment(ident, v["model"], v["first"], v["last"], input_digest(hidden, None), output, request)
    assert c.executor == v["executor"] and c.input_digest.hex() == v["input_digest_hex"]
    assert c.output_digest.hex() == v["output_digest_hex"] and c.body().hex() == v["body_hex"]
    assert c.digest().hex() == v["digest_hex"] and c.signature.hex() == v["signature_hex"] and c.valid_signature()


# ---- evidence ----


def evidence(accused="executor", out=LIE, witnesses=(("checker", TRUE), ("settler", TRUE))) -> OptimisticEvidence:
    return OptimisticEvidence(signed(accused, out), out, tuple((signed(n, o), o) for n, o in witnesses))


def test_evidence_verifies_and_round_trips():
    e = evidence()
    e.verify()
    assert OptimisticEvidence.from_wire(e.to_wire()) == e


@pytest.mark.parametrize("case", ["one witness", "accused agrees", "witnesses disagree", "same executor twice", "output swapped",
                                  "other layers"])
def test_evidence_that_does_not_hold_is_refused(case):
    if case == "one witness":
        e = evidence(witnesses=(("checker", TRUE),))
    elif case == "accused agrees":  # framing an honest executor with two agreeing witnesses fails
        e = evidence(out=TRUE)
    elif case == "witnesses disagree":
        e = evidence(witnesses=(("checker", TRUE), ("settler", array_to_wire(np.full((1, 8), 9.0, dtype=np.float32)))))
    elif case == "same executor twice":
        e = evidence(witnesses=(("checker", TRUE), ("checker", TRUE)))
    elif case == "output swapped":  # the accused's commitment is to TRUE, the evidence shows LIE
        e = OptimisticEvidence(signed("executor", TRUE), LIE, evidence().witnesses)
    else:
        other = sign_commitment(KEYS["settler"], MODEL, 1, 3, IN, TRUE, REQ)
        e = OptimisticEvidence(signed("executor", LIE), LIE, ((signed("checker", TRUE), TRUE), (other, TRUE)))
    with pytest.raises(ConsensusError):
        e.verify()


# ---- the check machine ----


def answer(check: OptimisticCheck, action: ReExecute, output, name: str):
    return check.on_answer(action.stage, KEYS[name].peer_id, output, signed(name, output, action.request))


def others():
    return {0: [KEYS["checker"].peer_id, KEYS["settler"].peer_id, KEYS["executor"].peer_id]}


def test_not_drawn_means_not_checked():
    check = OptimisticCheck(0.5, [run(TRUE)], others(), random.Random(1))
    while check.outcomes[0].drawn:  # find a seed that does not draw
        check = OptimisticCheck(0.5, [run(TRUE)], others(), random.Random(random.getrandbits(32)))
    assert check.start() == [] and check.report()["ran"] is False and check.outcomes[0].outcome == "not-drawn"


def test_agreement_closes_the_stage_and_never_asks_the_executor():
    check = OptimisticCheck(1.0, [run(TRUE)], others(), random.Random(2))
    [action] = check.start()
    assert action.peer_id != KEYS["executor"].peer_id
    assert answer(check, action, TRUE, "checker" if action.peer_id == KEYS["checker"].peer_id else "settler") == []
    assert check.finished and check.outcomes[0].outcome == "agree" and not check.report()["mismatch"]


@pytest.mark.parametrize("liar", ["executor", "checker"])
def test_a_mismatch_is_settled_by_a_third_provider(liar):
    rng = random.Random(3)
    executor_out = LIE if liar == "executor" else TRUE
    check = OptimisticCheck(1.0, [run(executor_out)], {0: [KEYS["checker"].peer_id]}, rng)
    [first] = check.start()
    check._queue[0].append(KEYS["settler"].peer_id)  # the settler joins after the draw
    [second] = answer(check, first, LIE if liar == "checker" else TRUE, "checker")
    assert second.peer_id == KEYS["settler"].peer_id and second.request != first.request  # fresh task and nonce each
    [penalise] = answer(check, second, TRUE, "settler")
    assert isinstance(penalise, Penalise) and penalise.evidence.member == KEYS[liar].peer_id
    penalise.evidence.verify()
    assert check.outcomes[0].outcome == ("executor-wrong" if liar == "executor" else "checker-wrong")
    assert check.report()["mismatch"] is (liar == "executor")


def test_a_mismatch_with_no_third_provider_is_reported_unresolved():
    check = OptimisticCheck(1.0, [run(LIE)], {0: [KEYS["checker"].peer_id]}, random.Random(4))
    [action] = check.start()
    assert answer(check, action, TRUE, "checker") == []
    assert check.outcomes[0].outcome == "unresolved" and check.report()["mismatch"] and not check.evidence
    failed = OptimisticCheck(1.0, [run(TRUE)], {0: [KEYS["checker"].peer_id]}, random.Random(4))
    [action] = failed.start()
    assert failed.on_failure(0, action.peer_id) == [] and failed.outcomes[0].outcome == "unchecked"


# ---- the detection probability ----


def test_the_formula():
    assert detection_probability(1.0, 1.0, 1) == 1.0 and detection_probability(0.0, 1.0, 100) == 0.0
    assert detection_probability(0.1, 0.5, 10) == pytest.approx(1 - 0.95**10)
    n = tasks_to_detect(0.1, 0.5, 0.99)
    assert detection_probability(0.1, 0.5, n) >= 0.99 > detection_probability(0.1, 0.5, n - 1)


SIGNED = {(name, out is LIE): signed(name, out) for name in KEYS for out in (TRUE, LIE)}


def caught_within(n: int, p: float, q: float, liar_rng: random.Random, client_rng: random.Random) -> bool:
    """n tasks of a liar (share q) through the real check machine; True once evidence names it."""
    liar = KEYS["executor"].peer_id
    for _ in range(n):
        lies = liar_rng.random() < q  # the executor decides before, and without, the client's draw
        out = LIE if lies else TRUE
        check = OptimisticCheck(p, [StageRun(1, 2, HIDDEN, None, out, SIGNED[("executor", lies)])], others(), client_rng)
        actions = check.start()
        while actions:
            action = actions.pop(0)
            if isinstance(action, Penalise):
                assert action.evidence.member == liar
                return True
            name = "checker" if action.peer_id == KEYS["checker"].peer_id else "settler"
            actions += check.on_answer(0, action.peer_id, TRUE, SIGNED[(name, False)])
    return False


@pytest.mark.parametrize("p,q,n", [(0.2, 0.3, 10), (0.05, 1.0, 20), (0.5, 0.1, 5)])
def test_detection_rate_matches_the_formula(p, q, n):
    """Empirical share of liars caught within n tasks, over many seeded runs, inside a
    4.5-sigma binomial bound of 1-(1-p*q)^n (fails about once in 150,000 runs by chance)."""
    runs = 1500
    liar_rng, client_rng = random.Random(f"liar {p} {q} {n}"), random.Random(f"client {p} {q} {n}")
    caught = sum(caught_within(n, p, q, liar_rng, client_rng) for _ in range(runs))
    expected = detection_probability(p, q, n)
    sigma = math.sqrt(expected * (1 - expected) / runs)
    assert abs(caught / runs - expected) <= 4.5 * sigma, (caught / runs, expected, sigma)


def test_an_honest_executor_is_never_accused():
    rng = random.Random(7)
    for _ in range(200):
        check = OptimisticCheck(1.0, [run(TRUE)], others(), rng)
        actions = check.start()
        for action in actions:
            name = "checker" if action.peer_id == KEYS["checker"].peer_id else "settler"
            assert answer(check, action, TRUE, name) == []
        assert check.outcomes[0].outcome == "agree" and not check.evidence
