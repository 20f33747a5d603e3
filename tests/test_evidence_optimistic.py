"""Optimistic mismatch evidence gossiped (issue 9): every auditor checks it offline
(``OptimisticEvidence.verify`` plus costly identities) and scores the accused once; what
does not hold, or would frame an honest executor, moves nothing and is not logged."""

import json

import numpy as np
import pytest

from p2p_infer.identity import Identity, solves_puzzle
from p2p_infer.proto.audit import AuditLog
from p2p_infer.proto.auditor import Auditor, evidence_message
from p2p_infer.proto.optimistic import CommitRequest, OptimisticEvidence, input_digest, sign_commitment
from p2p_infer.proto.reputation import R_START, Reputation, updated
from p2p_infer.proto.tensors import array_to_wire
from p2p_infer.testing.population import identities

MODEL = "f4824c9e60a9654844afb72cd9c0c8e6a9b3739e3f0e11ba507f61518d428823"
HIDDEN = array_to_wire(np.arange(8, dtype=np.float32).reshape(1, 8))
TRUE = array_to_wire(np.full((1, 8), 0.25, dtype=np.float32))
LIE = array_to_wire(np.full((1, 8), 0.75, dtype=np.float32))
IN = input_digest(HIDDEN, None)
EXECUTOR, CHECKER, SETTLER, REPORTER = identities(4, offset=40)


def signed(who: Identity, output, task: bytes = bytes(range(32))):
    return sign_commitment(who, MODEL, 1, 2, IN, output, CommitRequest(task, bytes(range(16))))


def evidence(accused=EXECUTOR, out=LIE, witnesses=((CHECKER, TRUE), (SETTLER, TRUE))) -> OptimisticEvidence:
    return OptimisticEvidence(signed(accused, out), out, tuple((signed(w, o), o) for w, o in witnesses))


def auditor(tmp_path) -> Auditor:
    return Auditor(Reputation(), AuditLog(tmp_path / "a.log", REPORTER, lambda: 1_000))


def logged(a: Auditor) -> list[str]:
    assert a.audit is not None
    path = a.audit.path
    return [json.loads(line)["kind"] for line in path.read_text().splitlines()] if path.exists() else []


def test_gossiped_optimistic_evidence_scores_the_accused_once_everywhere(tmp_path):
    a = auditor(tmp_path)
    message = evidence_message(evidence())
    assert a.observe(CHECKER.peer_id, message) == []
    assert a.reputation.of(EXECUTOR.peer_id) == pytest.approx(updated(R_START, True))
    a.observe(SETTLER.peer_id, message)  # the same evidence again, from another reporter: one task, one fault
    assert a.reputation.of(EXECUTOR.peer_id) == pytest.approx(updated(R_START, True))
    assert logged(a) == ["evidence", "reputation"]
    assert a.reputation.of(CHECKER.peer_id) == a.reputation.of(SETTLER.peer_id) == R_START


@pytest.mark.parametrize("case", ["honest accused", "one witness", "witness is the accused", "sybil witness", "tampered"])
def test_optimistic_evidence_that_does_not_hold_moves_nothing(tmp_path, case):
    if case == "honest accused":  # two colluding witnesses against an honest answer: the answer agrees with theirs
        e = evidence(out=TRUE)
    elif case == "one witness":
        e = evidence(witnesses=((CHECKER, TRUE),))
    elif case == "witness is the accused":
        e = evidence(witnesses=((CHECKER, TRUE), (EXECUTOR, TRUE)))
    elif case == "sybil witness":  # a fresh key costs nothing; a puzzle-solved one costs CPU-seconds
        fresh = next(i for i in (Identity.from_seed(bytes([n]) * 32) for n in range(1, 100)) if not solves_puzzle(i.public_key))
        e = evidence(witnesses=((CHECKER, TRUE), (fresh, TRUE)))
    else:  # the accused's commitment is to the true output, the evidence shows it another one
        e = OptimisticEvidence(signed(EXECUTOR, TRUE), LIE, evidence().witnesses)
    a = auditor(tmp_path)
    a.observe(CHECKER.peer_id, evidence_message(e))
    assert a.reputation.of(EXECUTOR.peer_id) == R_START
    assert logged(a) == []


def test_the_optimistic_evidence_vector_byte_for_byte(tmp_path):
    """protocols/test-vectors/optimistic-evidence.json: rebuilt from its seeds, the same bytes;
    decoded from its bytes, an auditor accepts it and scores the accused."""
    import importlib.util
    from pathlib import Path

    import msgpack

    here = Path(__file__).parent.parent / "protocols" / "test-vectors"
    spec = importlib.util.spec_from_file_location("gen", here / "generate_optimistic_evidence.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    v = json.loads((here / "optimistic-evidence.json").read_text())
    seeds = {k: bytes.fromhex(x) for k, x in v["seeds_hex"].items()}
    evidence, _ = gen.build(seeds)
    assert msgpack.packb(evidence_message(evidence), use_bin_type=True).hex() == v["message_hex"]
    a = auditor(tmp_path)
    a.observe(v["peer_ids"]["checker"], msgpack.unpackb(bytes.fromhex(v["message_hex"]), raw=False))
    assert a.reputation.of(v["peer_ids"]["accused"]) == pytest.approx(updated(R_START, True))
