"""Generation sessions, sans-IO: the peer's session table and the client's generation machine."""

import random

import numpy as np
import pytest

from p2p_infer.errors import (BadTensor, ForeignSession, NoRoute, OutOfOrder, ProtocolViolation, SessionLimit, SessionTooLong,
                              UnknownSession)
from p2p_infer.identity import Identity
from p2p_infer.proto.generation import GenerationMachine, output_digest, rows, signed_commitment, to_wire
from p2p_infer.proto.routing import Server
from p2p_infer.proto.session import OpenRequest, SessionLimits, SessionTable, StepRequest, output_reply, parse_request

MODEL = "ab" * 32
H = 8
A, B = "client-a", "client-b"


def sid(n: int) -> str:
    return f"{n:032x}"


def table(**kw) -> SessionTable:
    return SessionTable(SessionLimits(**{"max_sessions": 4, "max_sessions_per_client": 2, "max_tokens": 64,
                                         "memory_budget": 10_000, "ttl": 10.0, **kw}), bytes_per_token_layer=10)


def step(session: str, n: int, position: int, tokens: int = 1) -> StepRequest:
    return StepRequest(session, n, position, to_wire(np.zeros((tokens, H), dtype=np.float32)))


def test_open_step_close():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 2, 32), now=0.0)
    assert t.reserved == 32 * 2 * 10
    t.begin_step(A, step(sid(1), 0, 0, tokens=5), now=1.0)
    t.end_step(sid(1), 5, now=1.0)
    t.begin_step(A, step(sid(1), 1, 5), now=2.0)
    t.end_step(sid(1), 1, now=2.0)
    assert t.sessions[sid(1)].length == 6
    t.close(A, sid(1))
    assert t.reserved == 0 and not t.sessions


def test_limits_per_client_total_tokens_and_memory():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 8), 0.0)
    t.open(A, OpenRequest(sid(2), MODEL, 1, 1, 8), 0.0)
    with pytest.raises(SessionLimit, match="of this client"):
        t.open(A, OpenRequest(sid(3), MODEL, 1, 1, 8), 0.0)
    with pytest.raises(SessionTooLong):
        t.open(B, OpenRequest(sid(4), MODEL, 1, 1, 65), 0.0)
    with pytest.raises(SessionLimit, match="budget"):
        t.open(B, OpenRequest(sid(5), MODEL, 1, 20, 60), 0.0)  # 60 tokens x 20 layers x 10 B > what is left
    t.open(B, OpenRequest(sid(6), MODEL, 1, 1, 8), 0.0)
    t.open("client-c", OpenRequest(sid(7), MODEL, 1, 1, 8), 0.0)
    with pytest.raises(SessionLimit, match="maximum of 4"):
        t.open("client-d", OpenRequest(sid(8), MODEL, 1, 1, 8), 0.0)
    assert SessionLimit.retryable


def test_tokens_past_max_length_are_refused():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 4), 0.0)
    with pytest.raises(SessionTooLong):
        t.begin_step(A, step(sid(1), 0, 0, tokens=5), 0.0)
    assert not t.sessions[sid(1)].busy  # refused before it started


def test_out_of_order_and_foreign_steps_are_refused():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 16), 0.0)
    with pytest.raises(OutOfOrder):
        t.begin_step(A, step(sid(1), 1, 0), 0.0)  # step 1 before step 0
    with pytest.raises(OutOfOrder):
        t.begin_step(A, step(sid(1), 0, 3), 0.0)  # wrong position
    with pytest.raises(ForeignSession):
        t.begin_step(B, step(sid(1), 0, 0), 0.0)
    with pytest.raises(ForeignSession):
        t.close(B, sid(1))
    with pytest.raises(ForeignSession):
        t.open(B, OpenRequest(sid(1), MODEL, 1, 1, 16), 0.0)  # taking over another client's id
    t.begin_step(A, step(sid(1), 0, 0), 0.0)
    with pytest.raises(OutOfOrder, match="computing"):
        t.begin_step(A, step(sid(1), 1, 1), 0.0)
    with pytest.raises(UnknownSession):
        t.begin_step(A, step(sid(9), 0, 0), 0.0)


def test_ttl_expiry_frees_the_reservation_but_not_a_busy_session():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 8), 0.0)
    t.open(A, OpenRequest(sid(2), MODEL, 1, 1, 8), 0.0)
    t.begin_step(A, step(sid(2), 0, 0), 5.0)  # busy from 5 s
    assert t.expire(9.9) == []
    assert t.expire(10.0) == [sid(1)]
    assert t.expire(100.0) == []  # sid(2) is computing
    t.end_step(sid(2), 1, 100.0)
    assert t.expire(110.0) == [sid(2)] and t.reserved == 0
    with pytest.raises(UnknownSession):
        t.begin_step(A, step(sid(1), 0, 0), 111.0)


def test_activity_extends_the_ttl():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 8), 0.0)
    t.begin_step(A, step(sid(1), 0, 0), 8.0)
    t.end_step(sid(1), 1, 9.0)
    assert t.expire(15.0) == [] and t.expire(19.0) == [sid(1)]


@pytest.mark.parametrize("message, error", [
    ({"type": "session_open", "session": "x", "model": MODEL, "first": 1, "last": 2, "max_length": 4}, ProtocolViolation),
    ({"type": "session_open", "session": sid(1), "model": "nothex", "first": 1, "last": 2, "max_length": 4}, ProtocolViolation),
    ({"type": "session_open", "session": sid(1), "model": MODEL, "first": 3, "last": 2, "max_length": 4}, ProtocolViolation),
    ({"type": "session_open", "session": sid(1), "model": MODEL, "first": 1, "last": 2, "max_length": 0}, ProtocolViolation),
    ({"type": "session_open", "session": sid(1), "model": MODEL, "first": True, "last": 2, "max_length": 4}, ProtocolViolation),
    ({"type": "session_step", "session": sid(1), "step": 0, "position": 0, "hidden": {"dtype": "float32"}}, BadTensor),
    ({"type": "session_step", "session": sid(1), "step": -1, "position": 0, "hidden": to_wire(np.zeros((1, H)))}, ProtocolViolation),
    ({"type": "session_step", "session": sid(1), "step": 0, "position": 0, "hidden": to_wire(np.zeros((1, 3)))}, ProtocolViolation),
    ({"type": "session_step", "session": sid(1), "step": 0, "position": 0, "hidden": to_wire(np.zeros((1, H))), "commit": 1}, ProtocolViolation),
    ({"type": "session_rewind", "session": sid(1)}, ProtocolViolation),
])
def test_malformed_messages_are_refused(message, error):
    with pytest.raises(error):
        parse_request(message, hidden_size=H)


def test_messages_round_trip():
    o = OpenRequest(sid(1), MODEL, 1, 10, 64)
    assert parse_request(o.to_wire(), H) == o
    s = step(sid(1), 3, 40)
    assert parse_request(s.to_wire(), H) == s
    assert parse_request({"type": "session_close", "session": sid(1)}, H) == sid(1)


# ---- the client machine ----

class FakeSpan:
    """A span's honest arithmetic for the machine tests: output row = input row * 2 + its position
    (depends on the position, as a KV-cached span's output does)."""

    def __init__(self, identity: Identity):
        self.identity, self.sessions = identity, {}

    def answer(self, req: StepRequest, lie: float = 0.0) -> dict:
        x = rows(req.hidden)
        out = x * 2 + np.arange(req.position, req.position + len(x))[:, None] + lie
        return output_reply(req.session, req.step, to_wire(out), 1.0, 0.0,
                            signed_commitment(self.identity, req.session, req.step, req.position, out.astype(np.float32)))


def servers(spans):
    return [Server(pid, a, b, 100.0) for pid, a, b in spans]


def test_machine_replays_history_to_a_replacement():
    ids = {n: Identity.generate() for n in ("p1", "p2", "p3")}
    pid = {n: i.peer_id for n, i in ids.items()}
    spans = {pid["p1"]: FakeSpan(ids["p1"]), pid["p2"]: FakeSpan(ids["p2"]), pid["p3"]: FakeSpan(ids["p3"])}
    m = GenerationMachine(MODEL, 4, 1, H, servers([(pid["p1"], 1, 3), (pid["p2"], 1, 3)]), random.Random(0), max_length=16)
    plan = m.plan_step(0, to_wire(np.ones((3, H))))  # prefill of 3 tokens
    assert plan.open is not None and plan.step.position == 0
    m.on_opened(plan)
    first = plan.peer
    out = rows(m.on_output(plan, spans[first].answer(plan.step)))
    assert out.shape == (3, H)
    plan = m.plan_step(0, to_wire(np.full((1, H), 5.0)))
    assert plan.open is None and plan.step.position == 3 and plan.step.tokens == 1
    old = m.on_failure(plan, "unreachable: killed")
    assert old == plan.step.session
    plan = m.plan_step(0, to_wire(np.full((1, H), 5.0)))  # the replacement: open + history + this token
    assert plan.peer != first and plan.open is not None and plan.step.position == 0 and plan.step.tokens == 4
    m.on_opened(plan)
    out = rows(m.on_output(plan, spans[plan.peer].answer(plan.step)))
    assert np.array_equal(out, np.full((1, H), 5.0 * 2 + 3))  # as if it had never failed
    with pytest.raises(NoRoute, match="no replacement"):
        m.on_failure(m.plan_step(0, to_wire(np.ones((1, H)))), "again")


def test_machine_refuses_a_bad_commitment_and_catches_a_consistent_liar():
    honest, liar = Identity.generate(), Identity.generate()
    m = GenerationMachine(MODEL, 2, 1, H, servers([(liar.peer_id, 1, 1)]), random.Random(0), max_length=8)
    plan = m.plan_step(0, to_wire(np.ones((2, H))))
    reply = FakeSpan(liar).answer(plan.step, lie=0.5)
    forged = {**reply, "commitment": signed_commitment(honest, plan.step.session, plan.step.step, 0, rows(reply["hidden"]))}
    with pytest.raises(ProtocolViolation, match="own key"):
        m.on_output(plan, forged)
    tampered = {**reply, "hidden": to_wire(rows(reply["hidden"]) + 1)}
    with pytest.raises(ProtocolViolation, match="does not fit"):
        m.on_output(plan, tampered)
    m.on_output(plan, reply)  # consistent with its own commitment: only re-execution can tell
    honest_rows = rows(FakeSpan(honest).answer(StepRequest(plan.step.session, 0, 0, to_wire(m.slots[0].inputs)))["hidden"])
    assert m.check_reexecution(0, to_wire(honest_rows)) == [0, 1]
    assert m.blame(0, [0, 1]) == {liar.peer_id}
    assert m.check_reexecution(0, reply["hidden"]) == []


def test_digest_is_top_k_by_magnitude():
    out = np.zeros((2, 16), dtype=np.float32)
    out[0, 3], out[1, 7] = -9.0, 4.0
    d = output_digest(out)
    assert np.frombuffer(d["indices"], "<i4").reshape(2, -1)[:, 0].tolist() == [3, 7]
