"""Generation sessions, sans-IO: the peer's session table and the client's generation machine."""

import random

import numpy as np
import pytest

from p2p_infer.errors import (BadTensor, ForeignSession, ForwardIncomplete, NoRoute, OutOfOrder, ProtocolViolation, SessionLimit,
                              SessionTooLong, UnknownSession)
from p2p_infer.identity import Identity
from p2p_infer.proto.generation import GenerationMachine, output_digest, rows, signed_commitment, to_wire
from p2p_infer.proto.routing import Server
from p2p_infer.proto.session import (Hop, LinkRequest, OpenRequest, SessionLimits, SessionTable, StepRequest, forwarded_reply, hop_entry,
                                     output_reply, parse_request)

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
    t.end_step(sid(1), 0, 5, now=1.0)
    t.begin_step(A, step(sid(1), 1, 5), now=2.0)
    t.end_step(sid(1), 1, 1, now=2.0)
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
        t.begin_step(A, step(sid(1), 0, 3), 0.0)  # a position past the cache
    t.begin_step(A, step(sid(1), 0, 0), 0.0)
    t.end_step(sid(1), 0, 1, 0.0)
    with pytest.raises(OutOfOrder):
        t.begin_step(A, step(sid(1), 0, 1), 0.0)  # step 0 again: step numbers only grow
    t.drop(sid(1))
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 16), 0.0)
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
    t.end_step(sid(2), 0, 1, 100.0)
    assert t.expire(110.0) == [sid(2)] and t.reserved == 0
    with pytest.raises(UnknownSession):
        t.begin_step(A, step(sid(1), 0, 0), 111.0)


def test_activity_extends_the_ttl():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 8), 0.0)
    t.begin_step(A, step(sid(1), 0, 0), 8.0)
    t.end_step(sid(1), 0, 1, 9.0)
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
        out = (x * 2 + np.arange(req.position, req.position + len(x))[:, None] + lie).astype(np.float32)
        return output_reply(req.session, req.step, to_wire(out), 1.0, 0.0,
                            signed_commitment(self.identity, req.session, req.step, req.position, x, out))


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
    forged = {**reply, "commitment": signed_commitment(honest, plan.step.session, plan.step.step, 0, rows(plan.step.hidden),
                                                       rows(reply["hidden"]))}
    with pytest.raises(ProtocolViolation, match="own key"):
        m.on_output(plan, forged)
    tampered = {**reply, "hidden": to_wire(rows(reply["hidden"]) + 1)}
    with pytest.raises(ProtocolViolation, match="does not verify"):
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


def test_rewind_is_the_clients_and_upstream_steps_need_the_link():
    t = table()
    t.open(A, OpenRequest(sid(1), MODEL, 1, 1, 16, upstream="peer-0"), 0.0)
    assert t.begin_step("peer-0", step(sid(1), 0, 0, tokens=3), 0.0) [1] == 0  # the upstream hop may send steps
    t.end_step(sid(1), 0, 3, 0.0)
    with pytest.raises(OutOfOrder):
        t.begin_step("peer-0", step(sid(1), 1, 2), 0.0)  # only the client rewinds
    with pytest.raises(ForeignSession):
        t.begin_step("peer-x", step(sid(1), 1, 3), 0.0)
    _, position = t.begin_step(A, step(sid(1), 5, 2), 0.0)  # a gap in step numbers, and a rewind to 2
    assert position == 2 and t.sessions[sid(1)].length == 2
    t.end_step(sid(1), 5, 1, 0.0)
    assert t.sessions[sid(1)].length == 3 and t.sessions[sid(1)].next_step == 6
    t.link(A, LinkRequest(sid(1), "peer-1"))
    with pytest.raises(ForeignSession):
        t.begin_step("peer-0", step(sid(1), 6, 3), 0.0)  # unlinked
    t.begin_step("peer-1", step(sid(1), 6, 3), 0.0)
    with pytest.raises(ForeignSession):
        t.link("peer-1", LinkRequest(sid(1), "peer-2"))  # only the client links


def test_forwarded_messages_round_trip():
    route = (Hop("peer-1", sid(2), 4, 7), Hop("peer-2", sid(3), 0, 0))
    s = StepRequest(sid(1), 3, 7, to_wire(np.zeros((1, H))), True, True, route, "r" * 32)
    assert parse_request(s.to_wire(), H) == s
    o = OpenRequest(sid(1), MODEL, 1, 10, 64, "peer-0")
    assert parse_request(o.to_wire(), H) == o
    assert parse_request(LinkRequest(sid(1), None).to_wire(), H) == LinkRequest(sid(1), None)
    with pytest.raises(ProtocolViolation, match="request_id"):
        parse_request({**s.to_wire(), "request_id": ""}, H)
    with pytest.raises(ProtocolViolation, match="only for forwarded"):
        parse_request({**s.to_wire(), "forward": False}, H)


def _forwarded(ids, spans, m, x, tamper=None):
    """What the route would answer: each hop computes its FakeSpan and passes on (tests only)."""
    plan = m.plan_forward(to_wire(x))
    entries, hidden = [], plan.step.hidden
    for slot in m.slots:
        req = StepRequest(slot.session, slot.step, slot.cached, hidden, True)
        reply = spans[slot.peer].answer(req)
        entries.append(hop_entry(slot.peer, reply))
        hidden = reply["hidden"]
    if tamper is not None:
        entries[tamper] = {**entries[tamper], "hidden": to_wire(rows(entries[tamper]["hidden"]) + 0.25)}
    return plan, forwarded_reply(plan.step.session, plan.step.step, entries), {"hidden": entries[-1]["hidden"]}


def test_machine_forwarded_steps_check_every_entry_and_fall_back():
    ids = {n: Identity.generate() for n in ("a", "b", "c", "b2")}
    pid = {n: i.peer_id for n, i in ids.items()}
    spans = {pid[n]: FakeSpan(ids[n]) for n in ids}
    m = GenerationMachine(MODEL, 4, 1, H, servers([(pid["a"], 1, 1), (pid["b"], 2, 2), (pid["c"], 3, 3), (pid["b2"], 2, 2)]),
                          random.Random(1), max_length=16, forwarded=True, avoid={pid["b2"]})
    x = np.ones((2, H), dtype=np.float32)
    assert not m.can_forward(to_wire(x))  # nothing open yet
    for i in range(3):
        assert m.opening(i).upstream == (None if i == 0 else m.slots[i - 1].peer)
        m.on_opened(i)
    assert m.can_forward(to_wire(x)) and m.links() == []
    plan, reply, pushed = _forwarded(ids, spans, m, x)
    assert [h.peer for h in plan.step.route] == [pid["b"], pid["c"]]
    out = rows(m.on_forwarded(plan, reply, pushed))
    assert np.array_equal(out, ((x * 2 + [[0], [1]]) * 2 + [[0], [1]]) * 2 + [[0], [1]])
    assert [s.cached for s in m.slots] == [2, 2, 2] and [s.step for s in m.slots] == [1, 1, 1]
    plan, reply, pushed = _forwarded(ids, spans, m, x[:1], tamper=0)  # a later hop alters the first hop's relayed output
    with pytest.raises(ForwardIncomplete, match="does not verify"):
        m.on_forwarded(plan, reply, pushed)
    plan, reply, _ = _forwarded(ids, spans, m, x[:1])
    failed = forwarded_reply(plan.step.session, plan.step.step, reply["hops"][:1], {"peer": pid["b"], "code": "unreachable", "message": "gone"})
    with pytest.raises(ForwardIncomplete) as caught:
        m.on_forwarded(plan, failed, {})
    assert caught.value.failed == pid["b"]
    assert m.on_forward_failed(plan, pid["b"], "unreachable") is not None
    assert m.slots[1].peer == pid["b2"] and not m.slots[1].opened
    assert [s.step for s in m.slots] == [2, 0, 2] and [s.cached for s in m.slots] == [2, 0, 2]  # redo: rewind to 2
    assert not m.can_forward(to_wire(x[:1]))  # the replacement replays hop by hop first
    step = m.plan_step(1, to_wire(x[:1]))
    assert step.open.upstream == pid["a"] and step.step.tokens == 3
    m.on_opened(step)
    assert m.links() == [(2, LinkRequest(m.slots[2].session, pid["b2"]))]


class LayeredSpan(FakeSpan):
    """Per layer: row * 2 + position, so a span split in two parts computes what it did whole."""

    def __init__(self, identity: Identity, first: int, last: int):
        super().__init__(identity)
        self.layers = last - first + 1

    def answer(self, req: StepRequest, lie: float = 0.0) -> dict:
        x = rows(req.hidden)
        out = x.copy()
        for _ in range(self.layers):
            out = out * 2 + np.arange(req.position, req.position + len(x))[:, None]
        out = out.astype(np.float32)
        return output_reply(req.session, req.step, to_wire(out), 1.0, 0.0,
                            signed_commitment(self.identity, req.session, req.step, req.position, x, out))


def test_a_failed_span_no_one_peer_covers_is_re_split_and_replayed():
    ids = {n: Identity.generate() for n in ("whole", "lo", "hi")}
    ranges = {"whole": (1, 3), "lo": (1, 1), "hi": (2, 3)}
    spans = {ids[n].peer_id: LayeredSpan(ids[n], *ranges[n]) for n in ids}
    m = GenerationMachine(MODEL, 4, 1, H, servers([(ids[n].peer_id, *ranges[n]) for n in ids]), random.Random(0), max_length=16,
                          avoid={ids["lo"].peer_id, ids["hi"].peer_id})
    assert [s.peer for s in m.slots] == [ids["whole"].peer_id]

    def through(x):
        i, h = 0, to_wire(x)
        while i < len(m.slots):
            plan = m.plan_step(i, h)
            if plan.open is not None:
                m.on_opened(plan)
            h = m.on_output(plan, spans[plan.peer].answer(plan.step))
            i += 1
        return rows(h)

    expected = LayeredSpan(ids["whole"], 1, 3)
    x0, x1 = np.ones((3, H), dtype=np.float32), np.full((1, H), 5.0, dtype=np.float32)
    through(x0)
    m.on_failure(m.plan_step(0, to_wire(x1)), "unreachable: killed")
    assert [(s.first, s.last, s.peer) for s in m.slots] == [(1, 1, ids["lo"].peer_id), (2, 3, ids["hi"].peer_id)]
    assert m.resplits == [{"first": 1, "last": 3, "parts": [(1, 1), (2, 3)]}]
    with pytest.raises(NoRoute, match="not replayed"):
        m.plan_step(1, to_wire(x1))  # the second part's history comes from the first part's replay
    out = through(x1)
    assert np.array_equal(out, rows(expected.answer(StepRequest(sid(0), 0, 3, to_wire(x1)))["hidden"]))  # as if whole
    whole = rows(expected.answer(StepRequest(sid(0), 0, 0, to_wire(np.concatenate([x0, x1]))))["hidden"])
    assert np.array_equal(m.slots[1].outputs, whole)  # the rebuilt history verifies against a whole-span re-execution
    assert m.slots[0].producers == [ids["lo"].peer_id] * 4 and len(m.slots[1].inputs) == 4
    with pytest.raises(NoRoute, match="alone or split"):
        m.on_failure(m.plan_step(1, to_wire(x1)), "again")
