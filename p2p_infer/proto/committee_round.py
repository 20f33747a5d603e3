"""The client's committee round for one stage, as a sans-IO state machine.

In the style of rust-libp2p's ``ClosestPeersIter`` and h11: the driver feeds it events
(:meth:`CommitteeRound.start`, ``on_ticket``, ``on_answer``, ``on_failure``,
:meth:`~CommitteeRound.poll` for deadlines) and carries out the actions it returns (ask
these candidates for tickets, send these members the task, then one of decided / re-run /
failed). Since committee/3.0.0 a member answers the task in one round trip: its signed
commit, the signed reveal and the output together (members never see each other's replies;
the audit gossip waits for the commit deadline). Since committee/5.0.0 a ticket depends
only on the client's key and session (each query, stage and attempt ranks the same tickets
by its own draw), so the driver asks each candidate once per session and hands the tickets
to :meth:`~CommitteeRound.start`. It never sends, never reads the clock
and draws no randomness: every event carries ``now_ms``, and the request hash (with the
client's nonce in it) comes in with the :class:`StageSpec`.

The rules are :mod:`consensus`'s (``StageRound``, ``rank_tickets``, ``Evidence``); this
module only sequences them: tickets -> signed candidate set -> committee -> answers
(commit + reveal) -> decision, and on
no quorum a fresh committee (attempt + 1) without the members found faulty, at most
``max_reruns`` times. A stage is decided at its first quorum of agreeing answers (2 of 3):
``Decided`` comes then, without a judgement, and the members still out are judged when
they answer or the deadline passes (``Judged``), against the output already accepted.
With ``StageSpec.speculate`` the first valid answer comes out before that
(``Provisional``), so a driver can start the next stage while the quorum forms. Verdicts
become reputation updates and evidence in :func:`judge`, and :func:`apply_judgement`
applies them to a reputation table and an auditor.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from ..bounded import trim_oldest
from ..errors import ConsensusError, NoQuorum, UsageError
from ..identity import Identity
from .auditor import Auditor
from .committee_codec import MemberAnswer, TicketRequest, WireTensor
from .consensus import (
    MAX_CANDIDATES,
    MIN_K,
    NOT_ASKED,
    Candidate,
    CandidateSet,
    Commit,
    Evidence,
    StageDecision,
    StageRound,
    StageTask,
    Ticket,
    quorum_size,
    rank_tickets,
    sign_candidates,
)
from .reputation import Reputation
from .sortition import MAX_COMMIT_WINDOW_MS, NO_SESSION, check_candidate_record

log = structlog.get_logger("p2p_infer.committee_round")

TICKET_TIMEOUT_MS = 3000
# Once every stage of a query holds k tickets, the candidates still silent get this long
# before the committees are drawn without them (their tickets, when they come, serve later
# queries of the session): a cut-off candidate must not cost every query the whole timeout.
TICKET_GRACE_MS = 250
# A candidate that stays silent through the ticket deadline (an oversubscribed box, not a
# refusal) is asked again, at most TICKET_REASKS times per attempt, each time with the
# deadline doubled up to TICKET_BACKOFF_MAX times the first, before the stage fails short.
TICKET_REASKS = 2
TICKET_BACKOFF_MAX = 4
COMMIT_GRACE_MS = 1000  # wait past the deadline, so a late commit is judged late, not missing
MIN_COMMIT_WAIT_MS = 500
# Quorum first: the task goes to the quorum (the best-ranked ceil(2k/3) members) first; the
# rest are asked at once if those can no longer agree (a failure, a disagreement), if no
# quorum has formed HEDGE_MS after the send (a slow member), or else after the decision, to
# be judged against it (SendExecute.audit: the driver may hold them until the answer is out).
HEDGE_MS = 250


class QuorumLatency:
    """How long each stage's quorum takes to answer (a moving average per model and layers):
    the hedge waits a few times that before asking the members held back, within bounds."""

    FACTOR = 4
    MIN_MS = 50
    ALPHA = 0.2

    def __init__(self) -> None:
        self.ms: dict[tuple[str, int, int], float] = {}

    def observe(self, spec: StageSpec, ms: float) -> None:
        key = (spec.model_id, spec.first, spec.last)
        old = self.ms.pop(key, None)  # re-inserted last: the stages least recently seen go first
        self.ms[key] = ms if old is None else old + self.ALPHA * (ms - old)
        trim_oldest(self.ms, 1024)

    def hedge_ms(self, model_id: str, first: int, last: int, commit_timeout_ms: int) -> int:
        seen = self.ms.get((model_id, first, last))
        chosen = HEDGE_MS if seen is None else max(self.MIN_MS, int(self.FACTOR * seen))
        return max(1, min(chosen, commit_timeout_ms // 4))


@dataclass(frozen=True)
class StageSpec:
    """What one stage's committee runs, fixed before the first ticket is asked for."""

    request_hash: bytes  # binds model, input and the client's nonce
    stage: int
    model_id: str
    model_name: str
    first: int
    last: int
    input_hash: bytes
    k: int
    commit_timeout_ms: int
    max_reruns: int
    client: Identity  # signs the candidate sets; its key is in request_hash and in every task
    ticket_timeout_ms: int = TICKET_TIMEOUT_MS
    session: bytes = NO_SESSION  # the client's ticket session (committee/5.0.0): tickets serve every query in it
    hedge_ms: int = HEDGE_MS  # quorum first: ask the rest if no quorum has formed this long after the send
    quorum_first: bool = True  # False: every member at once (the round before quorum-first dispatch)
    speculate: bool = False  # hand out the first valid answer before the quorum (Provisional)

    def __post_init__(self) -> None:
        if self.k < MIN_K:  # members refuse such tasks and certificates are refused: say so before sending
            raise UsageError(f"a committee needs k >= {MIN_K} (docs/consensus.md); got k={self.k}")
        if not 0 < self.commit_timeout_ms <= MAX_COMMIT_WINDOW_MS:
            raise UsageError(f"the commit timeout must be within (0, {MAX_COMMIT_WINDOW_MS}] ms")
        if not 0 < self.hedge_ms < self.commit_timeout_ms:
            raise UsageError(f"the hedge delay must be within (0, {self.commit_timeout_ms}) ms (the commit timeout)")

    def task(self, attempt: int, now_ms: int) -> StageTask:
        return StageTask(self.request_hash, self.stage, attempt, self.model_id, self.first, self.last,
                         self.input_hash, self.k, now_ms, now_ms + self.commit_timeout_ms, self.client.public_key, self.session)

    @property
    def layers(self) -> str:
        return f"stage {self.stage} (layers {self.first}-{self.last})"


# ---- verdicts -> reputation -> evidence ----


@dataclass(frozen=True)
class ReputationUpdate:
    member: str
    task_id: bytes
    fault: bool


@dataclass
class Judgement:
    """What one closed round means for its members: one reputation update each (one task
    counts once), the verdicts to gossip, and the signed evidence of provable faults."""

    task_id: bytes
    stage: int
    verdicts: dict[str, str]
    updates: list[ReputationUpdate]
    evidence: list[Evidence]

    def record(self) -> dict[str, object]:
        """This stage's entry in the client's verdicts gossip."""
        return {"task": self.task_id, "stage": self.stage, "verdicts": self.verdicts}


NOT_A_FAULT = ("agree", "no-quorum")  # "no-quorum": disagreed where nobody could be shown wrong


def judge(rnd: StageRound, verdicts: dict[str, str], decision: StageDecision | None = None) -> Judgement:
    task_id = rnd.task.task_id
    # a member never sent the task (held back, and the round ended first) is not scored at all
    updates = [ReputationUpdate(m, task_id, v not in NOT_A_FAULT) for m, v in verdicts.items() if v != NOT_ASKED]
    evidence = [e for m, v in verdicts.items() if (e := evidence_for(rnd, m, v, decision)) is not None]
    return Judgement(task_id, rnd.task.stage, dict(verdicts), updates, evidence)


def evidence_for(rnd: StageRound, member: str, verdict: str, decision: StageDecision | None) -> Evidence | None:
    """Signed proof of a fault, when the round holds one; missing or late members leave
    none (a client could lie about what it received), so they only get a verdict."""
    if verdict == "wrong-output" and decision is not None:
        reveal, output = rnd.reveals[member]
        return Evidence("wrong-output", member, [rnd.commits[member]], reveal, output, decision.certificate)
    bad = rnd.bad_reveals.get(member)
    if verdict == "bad-reveal" and bad is not None and not bad.opens(rnd.commits[member]):
        return Evidence("bad-reveal", member, [rnd.commits[member]], bad, candidates=rnd.candidates)
    return None


def apply_judgement(judgement: Judgement, reputation: Reputation, auditor: Auditor, reporter: str) -> list[Evidence]:
    """Score the members, then check our own evidence as any peer would; return the
    evidence to publish (never what we could not check ourselves)."""
    for update in judgement.updates:
        reputation.record_task(update.member, update.task_id, fault=update.fault)
    checked = []
    for evidence in judgement.evidence:
        try:
            auditor.on_evidence(evidence, reporter=reporter)
        except ConsensusError as exc:
            log.error("own evidence did not verify", member=evidence.member, reason=exc.message)
            continue
        checked.append(evidence)
    return checked


# ---- actions ----


@dataclass(frozen=True)
class AskTickets:
    attempt: int
    request: TicketRequest
    peers: tuple[str, ...]
    deadline_ms: int


@dataclass(frozen=True)
class SendExecute:
    """Send these members the task. ``hedge_at_ms``: poll the round then (quorum first:
    members are held back until it). ``audit``: the stage is decided; these members are
    asked only to be judged against the decision, so the driver may hold the request until
    the query's answer is out (never past half the commit window)."""

    candidates: CandidateSet  # the signed candidate set, with the task: what each member checks
    members: tuple[str, ...]
    deadline_ms: int
    hedge_at_ms: int | None = None
    audit: bool = False

    @property
    def task(self) -> StageTask:
        return self.candidates.task


@dataclass(frozen=True)
class ObserveCommit:
    """A member's own signed commit, for the auditor: it may conflict with its gossip."""

    commit: Commit
    candidates: CandidateSet


@dataclass(frozen=True)
class Provisional:
    """Speculation (``StageSpec.speculate``): the stage's first valid answer (signed commit,
    reveal that opens it, output that hashes to it), before any quorum, once per stage. It
    is not a result and certifies nothing: a driver may start the next stage on it, and
    must start that stage again from the decided output when the two differ."""

    output: WireTensor
    member: str
    attempt: int


@dataclass(frozen=True)
class Decided:
    """The stage's answer. ``judgement`` is None when it was decided at the first quorum of
    agreeing answers: the members still out are judged later, in one :class:`Judged`."""

    decision: StageDecision
    attempts: int
    judgement: Judgement | None


@dataclass(frozen=True)
class Judged:
    """After an early decision: every member answered (or the deadline passed), so all are
    judged against the output already accepted; ``decision.verdicts`` is now final."""

    decision: StageDecision
    judgement: Judgement


@dataclass(frozen=True)
class Rerun:
    """No quorum: start the next attempt (call :meth:`CommitteeRound.start` again)."""

    attempt: int
    excluded: frozenset[str]
    reason: str
    judgement: Judgement


@dataclass(frozen=True)
class Failed:
    error: NoQuorum
    judgement: Judgement | None = None


Action = AskTickets | SendExecute | ObserveCommit | Provisional | Decided | Judged | Rerun | Failed


class Phase(enum.Enum):
    IDLE = "idle"  # before start, and between a Rerun and the next start
    TICKETS = "tickets"
    ANSWERS = "answers"  # commit + reveal + output, in one reply per member
    JUDGING = "judging"  # decided at the first quorum; the other members' answers are still judged
    DONE = "done"


# ---- the machine ----


@dataclass
class CommitteeRound:
    spec: StageSpec
    phase: Phase = Phase.IDLE
    attempt: int = -1
    excluded: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    task: StageTask | None = None
    round: StageRound | None = None
    tickets: list[Ticket] = field(default_factory=list)
    records: dict[str, bytes] = field(default_factory=dict)  # this attempt's candidates' record envelopes
    waiting: set[str] = field(default_factory=set)  # peers the current phase still waits for
    deadline_ms: int | None = None
    decision: StageDecision | None = None  # decided early: judged once the stragglers are in
    silent: set[str] = field(default_factory=set)  # asked for a ticket, timed out: asked again before failing
    ticket_asks: int = 0  # this attempt's ticket asks after the first
    held: tuple[str, ...] = ()  # quorum first: committee members not sent the task yet
    hedge_at_ms: int | None = None  # when the held members are asked if no quorum has formed
    provisional: bool = False  # speculation: the stage's first valid answer was handed out

    def ticket_deadline_ms(self, now_ms: int) -> int:
        """The deadline of this attempt's current ticket ask: doubled on each re-ask, bounded."""
        return now_ms + self.spec.ticket_timeout_ms * min(2**self.ticket_asks, TICKET_BACKOFF_MAX)

    def start(self, now_ms: int, candidates: Mapping[str, bytes], tickets: Iterable[Ticket] | None = None) -> list[Action]:
        """Begin the next attempt with the current providers of the stage's layers, each
        with the signed record the client holds for it (it goes into the candidate set).
        ``tickets``: this attempt's tickets, already fetched (the driver asks every candidate
        once per query); the ticket phase is skipped, unless they are too few for a committee:
        then the candidates without one are asked again (a stream that failed to open)."""
        if self.phase is not Phase.IDLE:
            raise UsageError(f"{self.spec.layers}: start() while {self.phase.value}")
        self.attempt += 1
        self.task = self.spec.task(self.attempt, now_ms)
        self.round, self.tickets = None, []
        self.records = {p: env for p, env in candidates.items() if p not in self.excluded}
        self.silent, self.ticket_asks = set(), 0
        peers = tuple(sorted(self.records))
        if tickets is not None:
            self.tickets = [t for t in tickets if t.peer_id in self.records]  # ranking verifies each on this seed
            have = {t.peer_id for t in self.tickets}
            # too few for a committee: ask the candidates whose ticket did not come again (the
            # prefetch was the first ask: a stream that failed to open, or a reply too slow)
            peers = () if len(have) >= self.spec.k else tuple(p for p in peers if p not in have)
            self.ticket_asks = 1
        deadline = self.ticket_deadline_ms(now_ms)
        self._enter(Phase.TICKETS, peers, deadline)
        if not peers:
            return self._close_tickets(now_ms)
        return [self._ask_tickets(peers, deadline)]

    def _ask_tickets(self, peers: tuple[str, ...], deadline_ms: int) -> AskTickets:
        assert self.task is not None
        request = TicketRequest(self.task.seed, self.spec.model_id, self.spec.first, self.spec.last)
        return AskTickets(self.attempt, request, peers, deadline_ms)

    def next_deadline_ms(self) -> int | None:
        if self.phase is Phase.ANSWERS and self.held and self.hedge_at_ms is not None and self.deadline_ms is not None:
            return min(self.hedge_at_ms, self.deadline_ms)
        return self.deadline_ms if self.phase in (Phase.TICKETS, Phase.ANSWERS, Phase.JUDGING) else None

    def poll(self, now_ms: int) -> list[Action]:
        """Ask the held members if the hedge delay has passed without a quorum; close the
        current phase if its deadline has passed."""
        deadline = self.next_deadline_ms()
        if deadline is None or now_ms < deadline:
            return []
        if self.phase is Phase.ANSWERS and self.held and self.deadline_ms is not None and now_ms < self.deadline_ms:
            log.info("no quorum within the hedge delay: asking the rest of the committee", stage=self.spec.stage,
                     waiting=sorted(self.waiting), held=list(self.held))
            return self._release(audit=False)
        if self.waiting:
            log.info("deadline passed", phase=self.phase.value, stage=self.spec.stage, silent=sorted(self.waiting))
            if self.phase is Phase.TICKETS:
                self.silent |= self.waiting
        return self._close(now_ms)

    # ---- events ----

    def on_ticket(self, peer: str, ticket: Ticket, now_ms: int) -> list[Action]:
        if not self._answered(Phase.TICKETS, peer):
            return []
        if ticket.peer_id == peer:  # a candidate speaks only for itself
            self.tickets.append(ticket)
        else:
            log.info("ticket names another peer", asked=peer, named=ticket.peer_id)
        return self._close(now_ms) if not self.waiting else []

    def on_answer(self, peer: str, answer: MemberAnswer, now_ms: int) -> list[Action]:
        """A member's one reply: its commit (judged by when it arrived) and, unless it
        withheld it, the reveal and output."""
        if not self._answered(Phase.ANSWERS, peer) and not self._answered(Phase.JUDGING, peer):
            return []
        actions: list[Action] = []
        if answer.commit.member != peer:  # a member speaks only for itself
            log.info("commit names another member", asked=peer, named=answer.commit.member)
        else:
            assert self.round is not None
            if answer.commit.task_id == self.round.task.task_id and answer.commit.candidates_id == self.round.candidates.id:
                actions.append(ObserveCommit(answer.commit, self.round.candidates))  # else bad-commit: nothing to audit
            self.round.on_commit(answer.commit, now_ms)
            if answer.reveal is not None and answer.output is not None:
                if answer.reveal.member == peer:
                    self.round.on_reveal(answer.reveal, answer.output)
                else:
                    log.info("reveal names another member", asked=peer, named=answer.reveal.member)
        if self.phase is Phase.ANSWERS:
            after = self._after_answer(now_ms)
            return actions + self._provisional(peer, after) + after
        return actions + (self._close(now_ms) if not self.waiting else [])

    def on_failure(self, peer: str, reason: str, now_ms: int, timed_out: bool = False) -> list[Action]:
        """``peer`` did not answer the current phase's request (unreachable, error reply,
        malformed reply): it counts as silent for this phase. ``timed_out``: the request ran
        to its deadline unanswered (not refused, not unreachable): a ticket is asked again."""
        if peer not in self.waiting:
            return []
        log.info("no answer", phase=self.phase.value, stage=self.spec.stage, peer=peer, reason=reason, timed_out=timed_out)
        self.waiting.discard(peer)
        if timed_out and self.phase is Phase.TICKETS:
            self.silent.add(peer)
        if self.phase is Phase.ANSWERS and self.held:
            return self._release(audit=False) if self._short_of_quorum() else []
        return self._close(now_ms) if not self.waiting else []

    # ---- transitions ----

    def _answered(self, phase: Phase, peer: str) -> bool:
        """Count an answer once, and only in the phase that asked for it (stale ones are dropped)."""
        if self.phase is not phase or peer not in self.waiting:
            return False
        self.waiting.discard(peer)
        return True

    def _enter(self, phase: Phase, peers: Iterable[str], deadline_ms: int | None) -> None:
        self.phase, self.waiting, self.deadline_ms = phase, set(peers), deadline_ms

    def _close(self, now_ms: int) -> list[Action]:
        if self.phase is Phase.TICKETS:
            return self._close_tickets(now_ms)
        if self.phase is Phase.ANSWERS:
            return self._decide()
        if self.phase is Phase.JUDGING:
            return self._judge_rest()
        return []

    def _close_tickets(self, now_ms: int) -> list[Action]:
        # the task is issued when the committee is drawn, not when its tickets were first asked
        # for: a slow ticket phase must not eat the members' commit window (records checked now)
        self.task = self.spec.task(self.attempt, now_ms)
        ranked = rank_tickets(self.tickets, self.task.seed, self.task.request_hash, self.task.stage, self.task.attempt)  # VRF: once per process
        eligible = self._eligible(ranked)
        committee = [c.ticket for c in eligible[: self.spec.k]]
        if len(committee) < self.spec.k:
            silent = tuple(sorted(self.silent - {t.peer_id for t in self.tickets}))
            if silent and self.ticket_asks < TICKET_REASKS:  # slow, not absent: ask them again, longer
                self.ticket_asks += 1
                self.silent = set()
                deadline = self.ticket_deadline_ms(now_ms)
                log.info("asking silent candidates again", stage=self.spec.stage, silent=silent, ask=self.ticket_asks, deadline_ms=deadline - now_ms)
                self._enter(Phase.TICKETS, silent, deadline)
                return [self._ask_tickets(silent, deadline)]
            # too few candidates: a re-run cannot do better
            note = f" ({len(silent)} silent after {self.ticket_asks} re-ask(s))" if silent else ""
            self.failures.append(f"{self.spec.layers}: {len(committee)} eligible candidates for a committee of {self.spec.k}{note}")
            return self._fail(None)
        signed = sign_candidates(self.spec.client, self.task, eligible)
        self.round = StageRound(signed, committee)
        wait_until = max(now_ms + MIN_COMMIT_WAIT_MS, self.task.commit_deadline_ms + COMMIT_GRACE_MS)
        members = tuple(self.round.members)  # in rank order: the quorum first is the best-ranked
        first = members[: quorum_size(self.spec.k)] if self.spec.quorum_first else members
        self.held = members[len(first):]
        self.hedge_at_ms = now_ms + self.spec.hedge_ms if self.held else None
        self._enter(Phase.ANSWERS, first, wait_until)
        return [SendExecute(signed, first, wait_until, hedge_at_ms=self.hedge_at_ms)]

    def _release(self, *, audit: bool) -> list[Action]:
        """Send the held members the task (now awaited like the others, same deadline)."""
        assert self.round is not None and self.deadline_ms is not None
        members, self.held, self.hedge_at_ms = self.held, (), None
        self.waiting |= set(members)
        return [SendExecute(self.round.candidates, members, self.deadline_ms, audit=audit)]

    def _short_of_quorum(self) -> bool:
        """The members asked can no longer form a quorum by themselves."""
        assert self.round is not None
        return self.round.largest_agreement() + len(self.waiting) < quorum_size(self.spec.k)

    def _after_answer(self, now_ms: int) -> list[Action]:
        early = self._decide_early() if (self.waiting or self.held) else []
        if early:
            return early
        if self.held and self._short_of_quorum():
            return self._release(audit=False)
        return self._close(now_ms) if not self.waiting and not self.held else []

    def _provisional(self, peer: str, after: list[Action]) -> list[Action]:
        """The stage's first valid answer, handed out once when speculating, unless this
        same answer already decided (or closed) the attempt."""
        if not self.spec.speculate or self.provisional or any(isinstance(a, (Decided, Rerun, Failed)) for a in after):
            return []
        assert self.round is not None
        answer = self.round.reveals.get(peer)
        if answer is None or peer in self.round.faults:
            return []
        self.provisional = True
        return [Provisional(answer[1], peer, self.attempt)]

    def _eligible(self, ranked: list[Ticket]) -> list[Candidate]:
        """Ranked candidates whose record a verifier will accept (the rest are left out, not
        signed into a set every member would then refuse), at most MAX_CANDIDATES."""
        assert self.task is not None
        out = []
        for ticket in ranked[:MAX_CANDIDATES]:
            envelope = self.records.get(ticket.peer_id, b"")
            try:
                check_candidate_record(self.task, ticket.peer_id, envelope)
            except ConsensusError as exc:
                log.info("candidate left out", peer=ticket.peer_id, reason=exc.message)
                continue
            out.append(Candidate(ticket, envelope))
        return out

    def _decide(self) -> list[Action]:
        rnd = self.round
        assert rnd is not None
        if self.held:  # the deadline came before they were asked: they are not judged
            rnd.excuse(self.held)
            self.held, self.hedge_at_ms = (), None
        try:
            decision = rnd.decide()
        except NoQuorum as exc:
            return self._no_quorum(rnd, exc.message)
        self._enter(Phase.DONE, (), None)
        return [Decided(decision, self.attempt + 1, judge(rnd, decision.verdicts, decision))]

    def _decide_early(self) -> list[Action]:
        """A quorum agrees before every member answered: decide now, judge the rest later
        (the stage waits for its quorum-th answer, not its slowest member)."""
        assert self.round is not None
        decision = self.round.quorum()
        if decision is None:
            return []
        self.decision = decision
        self.phase = Phase.JUDGING  # same members awaited, same deadline
        audit = self._release(audit=True) if self.held else []
        return [Decided(decision, self.attempt + 1, None), *audit]

    def _judge_rest(self) -> list[Action]:
        rnd, decision = self.round, self.decision
        assert rnd is not None and decision is not None
        rnd.judge_rest(decision)
        self._enter(Phase.DONE, (), None)
        return [Judged(decision, judge(rnd, decision.verdicts, decision))]

    def _no_quorum(self, rnd: StageRound, reason: str) -> list[Action]:
        self.failures.append(reason)
        judgement = judge(rnd, {m: rnd.faults.get(m, NOT_ASKED if m in rnd.excused else "no-quorum") for m in rnd.members})
        self.excluded.update(m for m in rnd.members if m in rnd.faults)
        if self.attempt >= self.spec.max_reruns:
            return self._fail(judgement)
        log.warning("no quorum, re-running the stage with a fresh committee", stage=self.spec.stage, attempt=self.attempt, reason=reason)
        self._enter(Phase.IDLE, (), None)
        return [Rerun(self.attempt + 1, frozenset(self.excluded), reason, judgement)]

    def _fail(self, judgement: Judgement | None) -> list[Action]:
        self._enter(Phase.DONE, (), None)
        error = NoQuorum(f"{self.spec.model_name} {self.spec.layers} failed after {len(self.failures)} attempt(s): " + " | ".join(self.failures))
        return [Failed(error, judgement)]
