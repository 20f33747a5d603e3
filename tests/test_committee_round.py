"""The committee machines driven with no network, on a virtual clock: the client's round
(proto/committee_round.py) against members' cores (proto/committee_member.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from p2p_infer.errors import NotSelected, ProtocolViolation, UsageError
from p2p_infer.identity import Identity
from p2p_infer.proto.auditor import Auditor
from p2p_infer.proto.committee_codec import MemberAnswer, activation_hash
from p2p_infer.proto import committee_member
from p2p_infer.proto.committee_member import PENDING_TTL_MS, MemberCore
from p2p_infer.proto.committee_round import (
    COMMIT_GRACE_MS,
    HEDGE_MS,
    AskTickets,
    CommitteeRound,
    Decided,
    Judged,
    Failed,
    ObserveCommit,
    Provisional,
    QuorumLatency,
    Rerun,
    TICKET_REASKS,
    TICKET_TIMEOUT_MS,
    SendExecute,
    StageSpec,
    apply_judgement,
)
from p2p_infer.proto.consensus import NOT_ASKED, StageTask, output_hash, request_hash
from p2p_infer.proto.reputation import Reputation, updated
from p2p_infer.testing.population import draw, identities, provider

MODEL = "ab" * 32
NOW = 1_764_000_000_000
CLIENT = identities(1)[0]


def tensor(values) -> dict:
    a = np.asarray(values, dtype="<f4").reshape(1, -1)
    return {"dtype": "float32", "shape": list(a.shape), "data": a.tobytes()}


HIDDEN = tensor(np.ones(32))
INPUT = activation_hash(HIDDEN, None)
HONEST = tensor(np.linspace(-1, 1, 32))


def wrong(shift: float = 0.5) -> dict:
    return tensor(np.linspace(-1, 1, 32) + shift)


def make_spec(**changes) -> StageSpec:
    spec = StageSpec(request_hash(MODEL, output_hash(HIDDEN), b"", b"n" * 32, CLIENT.public_key), 0, MODEL, "test-model", 1, 2, INPUT, 3,
                     commit_timeout_ms=2000, max_reruns=2, client=CLIENT)
    return replace(spec, **changes)


@dataclass
class SimMember:
    """A member on the simulated network: an honest core, with a behaviour for tests."""

    core: MemberCore
    output: dict = field(default_factory=lambda: HONEST)
    behaviour: str = ""  # "", "no-reveal", "late-commit", "silent"

    @property
    def record(self) -> bytes:
        return provider(self.core.identity, MODEL, 1, 2, NOW - 10_000).record


@dataclass
class Sim:
    """Carries the round's actions to the members and their answers back, in time order."""

    machine: CommitteeRound
    members: dict[str, SimMember]
    now: int = NOW
    observed: list = field(default_factory=list)
    rest: list = field(default_factory=list)  # what came with the outcome (a Judged, when all answered at once)
    late: list = field(default_factory=list)  # (when, peer, send): answers that come after the commit deadline
    sends: list = field(default_factory=list)  # every SendExecute, in order
    provisionals: list = field(default_factory=list)  # (speculate) each Provisional (only answers make one), decided by then?

    def step(self, actions: list) -> list:
        out: list = []
        for action in actions:
            if isinstance(action, AskTickets):
                out += self.tickets(action)
            elif isinstance(action, SendExecute):
                self.sends.append(action)
                out += self.execute(action)
            elif isinstance(action, ObserveCommit):
                self.observed.append(action.commit)
            else:
                out.append(action)
        if not out:  # nobody answers now: time passes, to the next deadline or late answer
            deadline = self.machine.next_deadline_ms()
            late = min(self.late, key=lambda entry: entry[0], default=None)
            if late is not None and (deadline is None or late[0] < deadline):
                self.late.remove(late)
                out = self.answer(late[1], late[2], late[0])
            elif deadline is not None:
                self.now = deadline
                out = self.machine.poll(self.now)
        return out

    def tickets(self, ask: AskTickets) -> list:
        out = []
        for peer in ask.peers:
            if self.members[peer].behaviour != "silent":
                out += self.machine.on_ticket(peer, self.members[peer].core.ticket(ask.request.seed), self.at(10))
        return out

    def execute(self, send: SendExecute) -> list:
        out = []
        for peer in send.members:
            member = self.members[peer]
            if member.behaviour == "silent":
                continue
            member.core.check_execute(send.candidates, INPUT, CLIENT.peer_id, self.now)
            if member.behaviour == "late-commit":  # answers after the commit deadline
                self.late.append((send.task.commit_deadline_ms + 300, peer, send))
                continue
            out += self.answer(peer, send, self.now + 10)
        return out

    def answer(self, peer: str, send: SendExecute, when: int) -> list:
        member = self.members[peer]
        answer = member.core.answer(send.candidates, member.output, os.urandom(32), self.at_time(when),
                                    reveal=member.behaviour != "no-reveal")
        out = []
        for action in self.machine.on_answer(peer, answer, self.now):
            if isinstance(action, ObserveCommit):
                self.observed.append(action.commit)
            elif isinstance(action, Provisional):
                self.provisionals.append((action, any(isinstance(a, Decided) for a in out)))
            else:
                out.append(action)
        return out

    def at(self, delay: int) -> int:
        return self.at_time(self.now + delay)

    def at_time(self, when: int) -> int:
        self.now = max(self.now, when)
        return self.now

    def until_outcome(self, actions: list):
        while not any(isinstance(a, (Decided, Rerun, Failed)) for a in actions):
            actions = self.step(actions)
        self.rest = [a for a in actions if not isinstance(a, (Decided, Rerun, Failed))]  # a Judged, or the audit send
        return next(a for a in actions if isinstance(a, (Decided, Rerun, Failed)))

    def judgement(self, outcome):
        """The outcome's judgement: at once, or (decided at the first quorum of agreeing
        answers) once the other members have answered or the deadline has passed."""
        if outcome.judgement is not None:
            return outcome.judgement
        actions = self.rest
        while not any(isinstance(a, Judged) for a in actions):
            assert self.machine.next_deadline_ms() is not None, "decided early, but nothing left to judge the rest"
            actions = self.step(actions)
        judged = next(a for a in actions if isinstance(a, Judged))
        assert judged.decision is outcome.decision
        return judged.judgement


def swarm(n: int, **spec_changes) -> Sim:
    members = {m.core.peer_id: m for m in (SimMember(MemberCore(ident)) for ident in identities(n, offset=1))}
    return Sim(CommitteeRound(make_spec(**spec_changes)), members)


def start(sim: Sim, candidates=None) -> list:
    peers = list(sim.members) if candidates is None else candidates
    return sim.machine.start(sim.now, {p: sim.members[p].record for p in peers})


# ---- the client's round ----


@pytest.mark.parametrize("fault,verdict", [("wrong", "wrong-output"), ("no-reveal", "missing-reveal"), ("late-commit", "late-commit")])
def test_one_faulty_member_of_three_is_outvoted_judged_and_scored(fault, verdict):
    sim = swarm(3)
    bad = next(iter(sim.members))
    if fault == "wrong":
        sim.members[bad].output = wrong()
    else:
        sim.members[bad].behaviour = fault
    outcome = sim.until_outcome(start(sim))
    assert isinstance(outcome, Decided) and outcome.attempts == 1
    assert outcome.decision.output == HONEST
    outcome.decision.certificate.verify()
    judgement = sim.judgement(outcome)  # the faulty member answers last (or not at all): judged after the decision
    assert outcome.decision.verdicts == {m: (verdict if m == bad else "agree") for m in sim.members}
    assert {u.member: u.fault for u in judgement.updates} == {m: m == bad for m in sim.members}
    assert {c.member for c in sim.observed} == set(sim.members)  # every direct commit goes to the auditor
    reputation = Reputation()
    auditor = Auditor(Reputation())
    published = apply_judgement(judgement, reputation, auditor, reporter="client")
    assert reputation.of(bad) == pytest.approx(updated(1.0, True))
    if fault == "wrong":  # provable: signed evidence any peer can check
        assert [(e.kind, e.member) for e in published] == [("wrong-output", bad)]
        published[0].verify()
        assert auditor.reputation.of(bad) == pytest.approx(updated(1.0, True))
    else:  # missing or late: a verdict only, no evidence (a client could lie about it)
        assert published == []


def speculating(first_behaviour: str = "", first_output: dict | None = None) -> tuple[Sim, list, list[str]]:
    """A committee of 3 whose best-ranked member (the first to answer) behaves as given."""
    sim = swarm(3, speculate=True)
    actions = sim.step(start(sim))  # the tickets are in: the committee is drawn, the quorum first
    assert isinstance(actions[0], SendExecute)
    ranked = list(sim.machine.round.members)
    first = sim.members[ranked[0]]
    first.behaviour = first_behaviour
    if first_output is not None:
        first.output = first_output
    return sim, actions, ranked


def test_speculation_hands_out_the_first_valid_answer_once_before_the_quorum():
    sim, actions, ranked = speculating()
    outcome = sim.until_outcome(actions)
    assert isinstance(outcome, Decided)
    sim.judgement(outcome)
    assert len(sim.provisionals) == 1
    provisional, decided_by_then = sim.provisionals[0]
    assert not decided_by_then and provisional.member == ranked[0] and provisional.attempt == 0
    assert provisional.output == HONEST == outcome.decision.output  # what the next stage starts on is what is certified


def test_a_wrong_first_answer_is_handed_out_and_the_decision_differs():
    sim, actions, ranked = speculating(first_output=wrong())
    outcome = sim.until_outcome(actions)
    assert isinstance(outcome, Decided) and outcome.decision.output == HONEST  # the held member was asked: outvoted
    [(provisional, _)] = sim.provisionals
    assert provisional.member == ranked[0] and provisional.output == wrong() != outcome.decision.output
    assert sim.judgement(outcome).verdicts[ranked[0]] == "wrong-output"


def test_an_answer_without_a_valid_reveal_is_never_handed_out():
    sim, actions, ranked = speculating(first_behaviour="no-reveal")
    outcome = sim.until_outcome(actions)
    assert isinstance(outcome, Decided) and outcome.decision.output == HONEST
    [(provisional, _)] = sim.provisionals
    assert provisional.member != ranked[0] and provisional.output == HONEST


def test_without_speculation_nothing_is_handed_out_before_the_decision():
    sim = swarm(3)
    outcome = sim.until_outcome(start(sim))
    assert isinstance(outcome, Decided) and sim.provisionals == []


def test_a_rerun_after_no_quorum_excludes_the_faulty_and_draws_a_fresh_committee():
    sim = swarm(5)
    actions = sim.step(start(sim))  # tickets answered: the committee is drawn
    assert isinstance(actions[0], SendExecute)
    first_committee = list(actions[0].members)
    silent = first_committee[:2]
    for peer in silent:
        sim.members[peer].behaviour = "no-reveal"
    rerun = sim.until_outcome(actions)
    assert isinstance(rerun, Rerun) and rerun.attempt == 1 and rerun.excluded == frozenset(silent)
    assert "1 of 3 agree, 2 needed" in rerun.reason
    assert {rerun.judgement.verdicts[p] for p in silent} == {"missing-reveal"}
    again = start(sim)
    assert isinstance(again[0], AskTickets) and set(again[0].peers) == set(sim.members) - set(silent)
    # committee/5.0.0: the session's one ticket seed; attempt 1 ranks the same tickets by a fresh draw
    assert again[0].request.seed == sim.machine.spec.task(0, NOW).seed == sim.machine.spec.task(1, NOW).seed
    outcome = sim.until_outcome(again)
    assert isinstance(outcome, Decided) and outcome.attempts == 2
    assert outcome.decision.certificate.task.attempt == 1
    sim.judgement(outcome)  # the member held back for the audit answers after the decision
    assert set(outcome.decision.verdicts.values()) == {"agree"} and not set(outcome.decision.verdicts) & set(silent)


def test_no_quorum_after_max_reruns_names_stage_layers_and_attempts():
    sim = swarm(3, max_reruns=1)
    for i, member in enumerate(sim.members.values()):
        member.output = wrong(0.5 * i)  # three different outputs: nobody agrees, nobody is provably wrong
    rerun = sim.until_outcome(start(sim))
    assert isinstance(rerun, Rerun) and rerun.excluded == frozenset()
    assert set(rerun.judgement.verdicts.values()) == {"no-quorum"}
    assert not any(u.fault for u in rerun.judgement.updates)
    failed = sim.until_outcome(start(sim))
    assert isinstance(failed, Failed)
    assert "test-model stage 0 (layers 1-2) failed after 2 attempt(s)" in failed.error.message
    assert failed.error.message.count("1 of 3 agree") == 2


def test_excluding_the_faulty_can_leave_too_few_candidates():
    sim = swarm(3)
    for member in list(sim.members.values())[:2]:
        member.behaviour = "no-reveal"
    assert isinstance(sim.until_outcome(start(sim)), Rerun)
    failed = sim.until_outcome(start(sim))
    assert isinstance(failed, Failed) and failed.judgement is None
    assert "failed after 2 attempt(s)" in failed.error.message
    assert "1 eligible candidates for a committee of 3" in failed.error.message


def test_ticket_deadline_expires_on_virtual_time_and_silent_candidates_are_asked_again_longer():
    sim = swarm(3)
    ask = start(sim)[0]
    assert isinstance(ask, AskTickets) and ask.deadline_ms == NOW + TICKET_TIMEOUT_MS
    assert sim.machine.poll(NOW + 2999) == []
    now, deadlines = NOW + TICKET_TIMEOUT_MS, []
    for _ in range(TICKET_REASKS):  # nobody answers: the silent are asked again, the deadline doubled
        again = sim.machine.poll(now)
        assert [type(a) for a in again] == [AskTickets] and set(again[0].peers) == set(sim.members)
        assert again[0].request == ask.request  # the same ticket: the session's seed
        deadlines.append(again[0].deadline_ms - now)
        assert sim.machine.poll(again[0].deadline_ms - 1) == []
        now = again[0].deadline_ms
    assert deadlines == [2 * TICKET_TIMEOUT_MS, 4 * TICKET_TIMEOUT_MS][:TICKET_REASKS]
    failed = sim.machine.poll(now)  # still silent after the last re-ask: the stage fails, with today's message
    assert isinstance(failed[0], Failed) and "0 eligible candidates for a committee of 3" in failed[0].error.message
    assert f"3 silent after {TICKET_REASKS} re-ask(s)" in failed[0].error.message
    assert sim.machine.on_ticket(ask.peers[0], sim.members[ask.peers[0]].core.ticket(ask.request.seed), now + 1) == []


def test_a_silent_candidate_that_answers_the_re_ask_is_used():
    sim = swarm(3)
    slow = sorted(sim.members)[0]
    sim.members[slow].behaviour = "silent"
    ask = start(sim)[0]
    assert sim.tickets(ask) == [] and sim.machine.waiting == {slow}  # two tickets in; the third is late
    again = sim.machine.poll(ask.deadline_ms)
    assert [type(a) for a in again] == [AskTickets] and again[0].peers == (slow,)
    assert again[0].deadline_ms == ask.deadline_ms + 2 * TICKET_TIMEOUT_MS
    sim.now = ask.deadline_ms + 4000  # answers within the longer deadline
    sim.members[slow].behaviour = ""
    outcome = sim.until_outcome(again)
    assert sim.now < again[0].deadline_ms + 3000  # decided on the answers, not at a deadline
    assert isinstance(outcome, Decided) and set(outcome.decision.verdicts) == set(sim.members)
    sim.judgement(outcome)
    assert set(outcome.decision.verdicts.values()) == {"agree"}
    outcome.decision.certificate.verify()


def test_a_timed_out_request_is_silence_but_a_refusal_or_unreachable_fails_at_once():
    sim = swarm(3)
    peers = sorted(sim.members)
    ask = start(sim)[0]
    for peer in peers[:2]:
        assert sim.machine.on_ticket(peer, sim.members[peer].core.ticket(ask.request.seed), NOW + 10) == []
    failed = sim.machine.on_failure(peers[2], "refused: not serving", NOW + 20)  # refused: no re-ask
    assert isinstance(failed[0], Failed) and "2 eligible candidates for a committee of 3" in failed[0].error.message
    assert "silent" not in failed[0].error.message
    sim = swarm(3)
    ask = start(sim)[0]
    for peer in peers[:2]:
        sim.machine.on_ticket(peer, sim.members[peer].core.ticket(ask.request.seed), NOW + 10)
    again = sim.machine.on_failure(peers[2], "did not answer within 3.0 s", NOW + TICKET_TIMEOUT_MS, timed_out=True)
    assert [type(a) for a in again] == [AskTickets] and again[0].peers == (peers[2],)
    assert isinstance(sim.until_outcome(again), Decided)


def test_too_few_providers_fail_at_once_without_a_re_ask():
    sim = swarm(2)
    failed = sim.step(start(sim))  # both answer: no one is silent, and two cannot make a committee of 3
    assert isinstance(failed[0], Failed) and "2 eligible candidates for a committee of 3" in failed[0].error.message


def test_commit_deadline_expires_on_virtual_time():
    sim = swarm(3, max_reruns=0)
    send = sim.step(start(sim))[0]
    assert isinstance(send, SendExecute) and len(send.members) == 2  # quorum first
    assert send.deadline_ms == send.task.commit_deadline_ms + COMMIT_GRACE_MS
    assert sim.machine.next_deadline_ms() == send.hedge_at_ms == NOW + 30 + HEDGE_MS  # tickets took 30 ms
    assert sim.machine.poll(send.hedge_at_ms - 1) == []
    hedge = sim.machine.poll(send.hedge_at_ms)  # no quorum in time: the rest of the committee is asked
    assert [type(a) for a in hedge] == [SendExecute] and not hedge[0].audit
    assert hedge[0].members == tuple(m for m in sim.machine.round.members if m not in send.members)
    assert hedge[0].deadline_ms == send.deadline_ms and sim.machine.next_deadline_ms() == send.deadline_ms
    assert sim.machine.poll(send.deadline_ms - 1) == []
    failed = sim.machine.poll(send.deadline_ms)[0]
    assert isinstance(failed, Failed) and set(failed.judgement.verdicts.values()) == {"missing-commit"}
    assert all(u.fault for u in failed.judgement.updates)


def test_one_round_trip_per_stage_and_prefetched_tickets_skip_the_ticket_phase():
    sim = swarm(3)
    seed = sim.machine.spec.task(0, NOW).seed
    tickets = [m.core.ticket(seed) for m in sim.members.values()]
    actions = sim.machine.start(NOW, {p: m.record for p, m in sim.members.items()}, tickets=tickets)
    assert [type(a) for a in actions] == [SendExecute]  # no ticket round: straight to the task
    kinds = []
    while not any(isinstance(a, Decided) for a in actions):
        actions = sim.step(actions)
        kinds += [type(a).__name__ for a in actions if not (isinstance(a, SendExecute) and a.audit)]
    assert "SendExecute" not in kinds and "AskTickets" not in kinds  # the answers decide: no reveal round
    decided = next(a for a in actions if isinstance(a, Decided))
    decided.decision.certificate.verify()
    stale = [m.core.ticket(b"x" * 32) for m in sim.members.values()]  # tickets for another seed rank nowhere
    failed = swarm(3).machine.start(NOW, {p: m.record for p, m in sim.members.items()}, tickets=stale)
    assert isinstance(failed[0], Failed) and "0 eligible candidates" in failed[0].error.message


def test_prefetched_tickets_too_few_for_a_committee_ask_only_the_missing_candidates():
    sim = swarm(3)
    seed = sim.machine.spec.task(0, NOW).seed
    peers = sorted(sim.members)
    tickets = [sim.members[p].core.ticket(seed) for p in peers[:2]]  # one ticket request failed to open its stream
    actions = sim.machine.start(NOW, {p: m.record for p, m in sim.members.items()}, tickets=tickets)
    assert [type(a) for a in actions] == [AskTickets] and actions[0].peers == (peers[2],) and actions[0].request.seed == seed
    outcome = sim.until_outcome(actions)
    assert isinstance(outcome, Decided) and set(outcome.decision.verdicts) == set(peers)


def test_prefetched_tickets_short_of_a_silent_candidate_re_ask_it_with_longer_deadlines_then_fail():
    sim = swarm(3)
    seed = sim.machine.spec.task(0, NOW).seed
    peers = sorted(sim.members)
    sim.members[peers[2]].behaviour = "silent"
    tickets = [sim.members[p].core.ticket(seed) for p in peers[:2]]  # the prefetch (the first ask) timed out on one
    ask = sim.machine.start(NOW, {p: m.record for p, m in sim.members.items()}, tickets=tickets)[0]
    assert ask.peers == (peers[2],) and ask.deadline_ms == NOW + 2 * TICKET_TIMEOUT_MS  # the prefetch was the first ask
    failed = sim.until_outcome([ask])
    assert isinstance(failed, Failed) and "2 eligible candidates for a committee of 3" in failed.error.message
    assert sim.now == NOW + 2 * TICKET_TIMEOUT_MS + 4 * TICKET_TIMEOUT_MS  # asked TICKET_REASKS times in all, the cap reached


def test_words_about_someone_else_blame_no_one():
    sim = swarm(3, max_reruns=0, quorum_first=False)  # every member at once
    send = sim.step(start(sim))[0]
    a, b, c = send.members
    answers = {p: sim.members[p].core.answer(send.candidates, HONEST, os.urandom(32), NOW) for p in send.members}
    assert [x for x in sim.machine.on_answer(a, answers[b], NOW) if not isinstance(x, ObserveCommit)] == []  # b's words: ignored
    assert sim.machine.on_answer("stranger", answers[c], NOW) == []  # not asked: ignored
    out = sim.machine.on_answer(b, answers[b], NOW) + sim.machine.on_answer(c, answers[c], NOW)
    assert [x.commit.member for x in out if isinstance(x, ObserveCommit)] == [b, c]
    decided = next(x for x in out if isinstance(x, Decided))
    assert isinstance(decided, Decided) and decided.decision.verdicts == {a: "missing-commit", b: "agree", c: "agree"}


def test_a_reply_for_another_task_is_a_bad_commit_and_is_not_audited():
    """A late reply to an earlier task read on a reused stream (seen in the churn scenario):
    the member is judged bad-commit and the commit never reaches the auditor, whose
    candidate-set check would refuse it (and once crashed the client doing so)."""
    sim = swarm(3, max_reruns=0, quorum_first=False)
    send = sim.step(start(sim))[0]
    a, b, c = send.members
    other, _ = member_draw(deadline=send.task.commit_deadline_ms)
    stale = sim.members[a].core.answer(other, HONEST, os.urandom(32), NOW)  # a's signed answer to another task
    assert stale.commit.member == a and stale.commit.task_id != send.task.task_id
    assert [x for x in sim.machine.on_answer(a, stale, NOW) if isinstance(x, ObserveCommit)] == []
    answers = {p: sim.members[p].core.answer(send.candidates, HONEST, os.urandom(32), NOW) for p in (b, c)}
    out = sim.machine.on_answer(b, answers[b], NOW) + sim.machine.on_answer(c, answers[c], NOW)
    decided = next(x for x in out if isinstance(x, Decided))
    assert decided.decision.verdicts == {a: "bad-commit", b: "agree", c: "agree"}


def test_start_is_refused_while_a_round_runs():
    sim = swarm(3)
    start(sim)
    with pytest.raises(UsageError):
        start(sim)


# ---- the member's rules ----


def member_draw(deadline: int = NOW + 2000, k: int = 3, n: int = 3):
    """A candidate set of n providers (the first n pool identities after the client)."""
    task = StageTask(request_hash(MODEL, output_hash(HIDDEN), b"", b"n" * 32, CLIENT.public_key), 0, 0, MODEL, 1, 2, INPUT, k,
                     NOW, deadline, CLIENT.public_key)
    pool = [provider(i, MODEL, 1, 2, NOW - 10_000) for i in identities(n, offset=1)]
    return draw(CLIENT, task, pool), pool


def test_a_member_signs_one_commitment_per_task():
    signed, pool = member_draw()
    core = MemberCore(pool[0].identity)
    task = signed.task
    first = core.commit(signed, HONEST, os.urandom(32), NOW)
    assert first.candidates_id == signed.id
    assert core.commit(signed, wrong(), os.urandom(32), NOW + 5) == first  # a repeated execute gets the same commit
    assert core.existing_commit(task, NOW + 10) == first
    reveal, pending = core.reveal(task.task_id, CLIENT.peer_id, NOW + 20)
    assert pending.output == HONEST and reveal.opens(first) and reveal.output_hash == output_hash(HONEST)
    with pytest.raises(ProtocolViolation, match="no pending output"):
        core.reveal(task.task_id, CLIENT.peer_id, NOW + 30)  # revealed once
    assert core.commit(signed, wrong(), os.urandom(32), NOW + 40) == first  # still never a second commitment


def test_a_member_answers_once_with_commit_reveal_and_output():
    signed, pool = member_draw()
    core = MemberCore(pool[0].identity)
    answer = core.answer(signed, HONEST, os.urandom(32), NOW)
    assert answer.reveal is not None and answer.reveal.opens(answer.commit) and answer.output == HONEST
    assert core.answer(signed, wrong(), os.urandom(32), NOW + 5) == answer  # a repeated execute: the same answer
    assert core.existing_answer(signed.task, NOW + PENDING_TTL_MS + 1) is None  # answers expire
    withheld = MemberCore(pool[1].identity).answer(signed, HONEST, os.urandom(32), NOW, reveal=False)
    assert withheld == MemberAnswer(withheld.commit, None, None)


def test_a_members_answers_are_bounded_and_an_evicted_task_keeps_its_one_commitment(monkeypatch):
    monkeypatch.setattr(committee_member, "MAX_ANSWERS", 4)
    pool = [provider(i, MODEL, 1, 2, NOW - 10_000) for i in identities(3, offset=1)]
    core = MemberCore(pool[0].identity)
    signed = []
    for i in range(6):
        task = StageTask(request_hash(MODEL, output_hash(HIDDEN), b"", bytes([i]) * 32, CLIENT.public_key), 0, 0, MODEL, 1, 2,
                         INPUT, 3, NOW, NOW + 2000, CLIENT.public_key)
        signed.append(draw(CLIENT, task, pool))
    answers = [core.answer(s, HONEST, os.urandom(32), NOW + i) for i, s in enumerate(signed)]
    assert len(core.answers) == 4 and core.existing_answer(signed[0].task, NOW + 10) is None  # the oldest went first
    again = core.answer(signed[0], wrong(), os.urandom(32), NOW + 11)
    assert again.commit == answers[0].commit and again.reveal is None  # never a second commitment for the task
    assert core.existing_answer(signed[5].task, NOW + 12) == answers[5]


def test_expiry_looks_at_the_oldest_entries_only():
    signed, pool = member_draw()
    core = MemberCore(pool[0].identity)
    core.answer(signed, HONEST, os.urandom(32), NOW)
    later, _ = member_draw(deadline=NOW + 3000)
    core.answer(later, HONEST, os.urandom(32), NOW + 1000)
    core.expire(NOW + PENDING_TTL_MS + 1)
    assert list(core.answers) == [later.task.task_id] and list(core.committed) == [later.task.task_id]


def test_a_member_checks_input_and_deadline_before_computing():
    signed, pool = member_draw()
    core = MemberCore(pool[0].identity)
    core.check_execute(signed, INPUT, CLIENT.peer_id, signed.task.commit_deadline_ms)
    with pytest.raises(ProtocolViolation, match="input does not match"):
        core.check_execute(signed, b"x" * 32, CLIENT.peer_id, NOW)
    with pytest.raises(ProtocolViolation, match="deadline has passed"):
        core.check_execute(signed, INPUT, CLIENT.peer_id, signed.task.commit_deadline_ms + 1)


def test_a_member_executes_only_what_its_candidate_set_selects_it_for():
    signed, pool = member_draw(n=4)
    members = set(signed.members)
    outsider = next(p for p in pool if p.peer_id not in members)  # the fourth-ranked candidate
    with pytest.raises(NotSelected, match="not among the k smallest"):
        MemberCore(outsider.identity).check_execute(signed, INPUT, CLIENT.peer_id, NOW)
    member = MemberCore(next(p for p in pool if p.peer_id in members).identity)
    member.check_execute(signed, INPUT, CLIENT.peer_id, NOW)
    with pytest.raises(NotSelected, match="task is"):  # someone else relays the client's task
        member.check_execute(signed, INPUT, pool[3].peer_id, NOW)
    with pytest.raises(NotSelected, match="below the minimum"):
        member.check_execute(member_draw(k=1, n=1)[0], INPUT, CLIENT.peer_id, NOW)


def test_only_the_tasks_client_gets_the_reveal():
    signed, pool = member_draw()
    core = MemberCore(pool[0].identity)
    core.commit(signed, HONEST, os.urandom(32), NOW)
    with pytest.raises(NotSelected, match="only the task's client"):
        core.reveal(signed.task.task_id, pool[1].peer_id, NOW + 1)  # a peer asking early could copy the output
    reveal, _ = core.reveal(signed.task.task_id, CLIENT.peer_id, NOW + 2)  # still there for the client
    assert reveal.member == pool[0].peer_id


def test_pending_outputs_expire_on_the_passed_in_clock():
    signed, pool = member_draw()
    core = MemberCore(pool[0].identity)
    task = signed.task
    core.commit(signed, HONEST, os.urandom(32), NOW)
    core.expire(NOW + PENDING_TTL_MS)
    assert task.task_id in core.pending  # kept for the whole TTL
    with pytest.raises(ProtocolViolation, match="no pending output"):
        core.reveal(task.task_id, CLIENT.peer_id, NOW + PENDING_TTL_MS + 1)
    assert core.existing_commit(task, NOW + PENDING_TTL_MS + 1) is None and not core.committed


def test_a_committee_below_the_minimum_is_refused_before_anything_is_sent():
    with pytest.raises(UsageError, match="k >= 3"):
        make_spec(k=1)


@pytest.mark.parametrize("last", ["wrong", "honest", "silent"])
def test_a_stage_is_decided_at_its_first_quorum_and_the_last_member_judged_after(last):
    sim = swarm(3, max_reruns=0)
    send = sim.step(start(sim))[0]
    assert isinstance(send, SendExecute) and send.members == tuple(sim.machine.round.members[:2])  # the best-ranked quorum
    first, second = send.members
    third = sim.machine.round.members[2]
    output = {first: HONEST, second: HONEST, third: wrong() if last == "wrong" else HONEST}
    answers = {p: sim.members[p].core.answer(send.candidates, output[p], os.urandom(32), NOW + 10) for p in sim.members}
    assert [a for a in sim.machine.on_answer(first, answers[first], NOW + 10) if not isinstance(a, ObserveCommit)] == []
    decided = [a for a in sim.machine.on_answer(second, answers[second], NOW + 20) if not isinstance(a, ObserveCommit)]
    assert [type(a) for a in decided] == [Decided, SendExecute] and decided[0].judgement is None  # not waiting for the third
    audit = decided[1]  # the third is asked after the decision, to be judged against it
    assert audit.audit and audit.members == (third,) and audit.deadline_ms == send.deadline_ms
    decision = decided[0].decision
    decision.certificate.verify()
    assert decision.output == HONEST and decision.verdicts == {first: "agree", second: "agree", third: "pending"}
    if last == "silent":
        assert sim.machine.poll(send.deadline_ms - 1) == []
        out = sim.machine.poll(send.deadline_ms)
    else:
        out = [a for a in sim.machine.on_answer(third, answers[third], NOW + 30) if not isinstance(a, ObserveCommit)]
    assert len(out) == 1 and isinstance(out[0], Judged) and out[0].decision is decision
    expected = {"wrong": "wrong-output", "honest": "agree", "silent": "missing-commit"}[last]
    assert decision.verdicts == {first: "agree", second: "agree", third: expected}  # the report's dict, filled in place
    assert {u.member: u.fault for u in out[0].judgement.updates} == {first: False, second: False, third: last != "honest"}
    evidence = out[0].judgement.evidence
    assert [(e.kind, e.member) for e in evidence] == ([("wrong-output", third)] if last == "wrong" else [])
    for e in evidence:  # against the certificate of the early decision, checkable by anyone
        e.verify()
    assert sim.machine.phase.value == "done" and sim.machine.next_deadline_ms() is None


@pytest.mark.parametrize("how", ["disagrees", "fails", "withholds"])
def test_the_rest_is_asked_at_once_when_the_first_quorum_cannot_agree(how):
    sim = swarm(3, max_reruns=0)
    send = sim.step(start(sim))[0]
    first, second = send.members
    third = sim.machine.round.members[2]
    answers = {p: sim.members[p].core.answer(send.candidates, wrong() if p == second else HONEST, os.urandom(32), NOW + 10,
                                             reveal=not (p == second and how == "withholds")) for p in sim.members}
    assert [a for a in sim.machine.on_answer(first, answers[first], NOW + 10) if not isinstance(a, ObserveCommit)] == []
    if how == "fails":
        out = sim.machine.on_failure(second, "unreachable", NOW + 20)
    else:
        out = [a for a in sim.machine.on_answer(second, answers[second], NOW + 20) if not isinstance(a, ObserveCommit)]
    assert [type(a) for a in out] == [SendExecute] and out[0].members == (third,) and not out[0].audit  # no hedge wait
    assert sim.machine.next_deadline_ms() == send.deadline_ms
    final = [a for a in sim.machine.on_answer(third, answers[third], NOW + 30) if not isinstance(a, ObserveCommit)]
    assert [type(a) for a in final] == [Decided] and final[0].judgement is not None  # everyone asked has answered
    verdict = {"disagrees": "wrong-output", "fails": "missing-commit", "withholds": "missing-reveal"}[how]
    assert final[0].decision.verdicts == {first: "agree", second: verdict, third: "agree"}
    final[0].decision.certificate.verify()


def test_a_held_member_the_round_ends_without_is_not_judged():
    """The deadline passes before the hedge was polled (a starved driver): the held member
    was never sent the task, so it is neither at fault nor scored."""
    sim = swarm(3, max_reruns=0)
    send = sim.step(start(sim))[0]
    third = sim.machine.round.members[2]
    failed = sim.machine.poll(send.deadline_ms)
    assert [type(a) for a in failed] == [Failed]
    assert failed[0].judgement.verdicts == {**{m: "missing-commit" for m in send.members}, third: NOT_ASKED}
    assert {u.member for u in failed[0].judgement.updates} == set(send.members)


def test_every_member_at_once_without_quorum_first():
    sim = swarm(3, quorum_first=False)
    send = sim.step(start(sim))[0]
    assert len(send.members) == 3 and send.hedge_at_ms is None
    assert sim.machine.next_deadline_ms() == send.deadline_ms
    with pytest.raises(UsageError, match="hedge delay"):
        make_spec(hedge_ms=2000)  # not inside the commit window


def test_the_hedge_waits_a_few_times_the_quorums_usual_latency_within_bounds():
    hedges, spec = QuorumLatency(), make_spec()
    assert hedges.hedge_ms(spec.model_id, spec.first, spec.last, 4000) == HEDGE_MS  # nothing seen yet
    hedges.observe(spec, 5)
    assert hedges.hedge_ms(spec.model_id, spec.first, spec.last, 4000) == QuorumLatency.MIN_MS  # 4 x 5 ms is under the floor
    for _ in range(40):  # the moving average follows a slower quorum
        hedges.observe(spec, 100)
    assert hedges.hedge_ms(spec.model_id, spec.first, spec.last, 4000) == pytest.approx(400, abs=2)
    assert hedges.hedge_ms(spec.model_id, spec.first, spec.last, 1000) == 250  # at most a quarter of the commit window
    assert hedges.hedge_ms(spec.model_id, spec.first + 1, spec.last + 1, 4000) == HEDGE_MS  # per model and layers
    for i in range(2000):
        hedges.observe(replace(spec, first=i, last=i), 10)
        hedges.observe(spec, 100)  # a stage in use all along
    assert len(hedges.ms) <= 1024  # memory stays bounded
    assert (spec.model_id, spec.first, spec.last) in hedges.ms  # and what is evicted is what was least recently seen

