"""The client's side of committee mode, as a thin trio driver over the sans-IO round in
:mod:`proto.committee_round`: one committee per remaining stage, its requests sent
concurrently, every answer fed to the machine, and its verdicts, reputation and
evidence applied here. The stage verdicts are gossiped once per query. The route is
planned once per query. Tickets are per client session (committee/5.0.0,
:class:`TicketSession`): a candidate's ticket is asked for once per session, in one
concurrent round with the other missing ones, and serves every query, stage and attempt
in it, so a query whose candidates' tickets are held sends no ticket request at all; each
stage then costs one round trip (execute -> commit + reveal + output).

Each candidate goes into the signed candidate set with the record the client's directory
holds for it; a record younger than ``MIN_RECORD_AGE_MS`` (just re-published) is waited
for, at most that long, rather than dropped. After a query, ``client.last_certified``
holds the certified input and output as activation files (``--save-input``,
``--save-output``), for ``p2p-infer verify CERT --input/--output``."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import structlog
import trio

from ..clock import now_ms
from ..errors import ConsensusError, NoQuorum, P2PInferError, PeerTimedOut
from ..ml.models import Activation, SplitModel
from ..ml.tensors import decode_tensor, encode_tensor
from ..proto.auditor import evidence_message
from ..proto.committee_codec import (
    ExecuteRequest,
    TicketRequest,
    WireTensor,
    activation_hash,
    parse_result_reply,
    parse_ticket_reply,
    verdicts_message,
)
from ..proto.committee_round import (
    TICKET_GRACE_MS,
    TICKET_TIMEOUT_MS,
    Action,
    AskTickets,
    CommitteeRound,
    Decided,
    Failed,
    Judged,
    Judgement,
    ObserveCommit,
    Provisional,
    Rerun,
    SendExecute,
    StageSpec,
    apply_judgement,
)
from ..proto.consensus import Certificate, Evidence, StageCertificate, StageDecision, Ticket, activation_file, mask_hash_of, output_hash, request_hash, ticket_seed
from ..proto.sortition import MIN_RECORD_AGE_MS
from ..proto.wire import COMMITTEE_PROTOCOL, Message
from .results import HopReport

log = structlog.get_logger("p2p_infer.client")

SPECULATE = True  # start each stage on the previous stage's first valid answer (QueryStages)

Feed = Callable[[str, Message], list[Action]]


class Judging:
    """A committee query's judgement, final once the members that answered after each
    stage's quorum are judged (in the client's background nursery): ``await
    result.judged`` returns every stage's verdicts; ``result.stages`` then holds them too.
    The client's close waits for it (bounded), as for an optimistic check."""

    def __init__(self) -> None:
        self.rounds: list[trio.Event] = []  # one per stage attempt: set once its judgement is applied
        self.answered = trio.Event()  # the query's answer is out: members held for the audit are asked now
        self.records: list[dict[str, Any]] = []  # the verdicts gossip of this query
        self.report: dict[str, Any] = {"pending": True}

    @property
    def done(self) -> bool:
        return all(e.is_set() for e in self.rounds)

    async def wait(self) -> dict[str, Any]:
        for event in list(self.rounds):
            await event.wait()
        self.report = {"verdicts": [r["verdicts"] for r in self.records]}
        return self.report

    def __await__(self) -> Generator[Any, None, dict[str, Any]]:
        return self.wait().__await__()


async def run_committees(client: Any, model: SplitModel, act: Activation) -> tuple[Activation, list[HopReport], list[dict[str, Any]], bytes, Judging]:
    """Every remaining stage on a committee; the certificate chains them. The stage
    verdicts are gossiped once per query, when every member is judged (success or not)."""
    assert client.committee is not None
    judging = Judging()
    client._checks.append(judging)  # the client's close waits for it
    try:
        return (*await run_stages(client, model, act, judging), judging)
    finally:
        judging.answered.set()
        spawn(client, publish_verdicts, client, judging)


async def publish_verdicts(client: Any, judging: Judging) -> None:
    with trio.move_on_after(3 * client.request_timeout):  # a judgement ends by its commit deadline; this is a bound
        await judging.wait()
    if judging.records:
        client._publish(verdicts_message(client.identity.peer_id, judging.records))


def spawn(client: Any, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run ``fn`` in the client's nursery (it outlives the query: judging after the answer)."""
    nursery = client._nursery
    if nursery is None:
        raise P2PInferError("the client is not running (use it as an async context manager)")
    nursery.start_soon(fn, *args)


async def run_stages(client: Any, model: SplitModel, act: Activation, judging: Judging) -> tuple[Activation, list[HopReport], list[dict[str, Any]], bytes]:
    nonce = os.urandom(32)  # the client's nonce: its one source of randomness for the request
    first_hidden, first_mask = encode_tensor(act.hidden), None if act.mask is None else encode_tensor(act.mask)
    hidden_hash, mask_hash = output_hash(first_hidden), mask_hash_of(first_mask)
    req_hash = request_hash(model.model_id, hidden_hash, mask_hash, nonce, client.identity.public_key)
    session = client.ticket_session.current(now_ms())
    segments = await client._plan_or_refresh(model, client.local_layers, ())
    servers = client.servers(model)  # the query's view of the providers: each stage's first attempt draws from it
    tickets = await prefetch_tickets(client, model, session, [(s.first, s.last) for s in segments], servers)
    query = QueryStages(client, model, req_hash, judging, session, servers)
    drivers = await query.run([(s.first, s.last) for s in segments], tickets, first_hidden, first_mask)
    stages: list[StageCertificate] = []
    reports: list[dict[str, Any]] = []
    hops: list[Any] = []
    for driver in drivers:
        decision, spec = driver.decision, driver.machine.spec
        assert decision is not None
        stages.append(decision.certificate)
        reports.append({"stage": spec.stage, "first": spec.first, "last": spec.last, "attempts": driver.attempts,
                        "restarts": query.restarts.get(spec.stage, 0), "verdicts": decision.verdicts})
        hops.append(HopReport(",".join(m for m, v in decision.verdicts.items() if v == "agree"), spec.first, spec.last,
                              round_trip_ms=driver.elapsed_ms))
    cert = Certificate(model.model_id, client.identity.public_key, nonce, hidden_hash, mask_hash, stages)
    client.last_certified = {"input": activation_file(first_hidden, first_mask),
                             "output": activation_file(stages[-1].outputs[0], first_mask)}
    return Activation(decode_tensor(stages[-1].outputs[0], field="output"), act.mask), hops, reports, cert.encode()


class QueryStages:
    """A query's stages, speculatively pipelined: stage i+1 starts on stage i's first valid
    answer (``Provisional``) while stage i's quorum forms. The stages are then confirmed in
    order; where a decided output is not the one the next stage was started on (a wrong
    first answer), the later stages are abandoned and started again from the decided
    output. What is accepted is exactly what a sequential run accepts: every stage's quorum
    certificate, each stage's input the previous stage's certified output."""

    def __init__(self, client: Any, model: SplitModel, req_hash: bytes, judging: Judging, session: bytes,
                 servers: list[Any]) -> None:
        self.client, self.model, self.req_hash, self.judging = client, model, req_hash, judging
        self.session, self.servers = session, servers
        self.restarts: dict[int, int] = {}  # stage -> times it was started again from the decided input
        self.launched: list[RoundDriver] = []

    async def run(self, layers: list[tuple[int, int]], tickets: list[list[Ticket]], hidden: WireTensor,
                  mask: WireTensor | None) -> list[RoundDriver]:
        outcome: list[RoundDriver] | P2PInferError
        async with trio.open_nursery() as nursery:
            try:
                outcome = await self._pipeline(nursery, layers, tickets, hidden, mask)
            except P2PInferError as exc:  # raised outside the nursery, so not as an exception group
                outcome = exc
            finally:
                for driver in self.launched:
                    if driver.held is not None:  # never confirmed (the query failed before): judged by nobody
                        driver.abandon()
            nursery.cancel_scope.cancel()  # abandoned speculation still waiting for its quorum
        if isinstance(outcome, P2PInferError):
            raise outcome
        return outcome

    async def _pipeline(self, nursery: trio.Nursery, layers: list[tuple[int, int]], tickets: list[list[Ticket]],
                        hidden: WireTensor, mask: WireTensor | None) -> list[RoundDriver]:
        drivers: list[RoundDriver] = []
        while True:
            # a stage that failed ends the launching; its error stands once its input is confirmed
            # (a wrong first answer shaped to make the next stage fail must not fail the query)
            while len(drivers) < len(layers) and (not drivers or drivers[-1].error is None):
                i = len(drivers)
                given = hidden if i == 0 else drivers[-1].basis
                assert given is not None
                drivers.append(await self._launch(nursery, i, layers[i], given, mask, tickets[i]))
            redo = await self._confirm(drivers)
            if redo is None:
                return drivers
            for abandoned in drivers[redo:]:
                abandoned.abandon()
            self.restarts[redo] = self.restarts.get(redo, 0) + 1
            del drivers[redo:]

    async def _launch(self, nursery: trio.Nursery, stage: int, layers: tuple[int, int], hidden: WireTensor,
                      mask: WireTensor | None, tickets: list[Ticket] | None) -> RoundDriver:
        driver = stage_driver(self.client, self.model, stage, layers, hidden, mask, self.req_hash, self.judging,
                              self.session, tickets, self.servers)
        self.launched.append(driver)
        nursery.start_soon(driver.conclude)
        await driver.ready.wait()  # its first valid answer, or its outcome
        return driver

    async def _confirm(self, drivers: list[RoundDriver]) -> int | None:
        """Wait for each stage's decision in order (each stage's input confirmed by then, so
        its error stands); the first stage after a decision that is not what that stage was
        started on (None: every stage stands)."""
        for i, driver in enumerate(drivers):
            await driver.done.wait()
            if driver.error is not None:
                raise driver.error
            assert driver.decision is not None
            if driver.basis != driver.decision.output:
                log.info("speculation discarded: the first answer was not the decided output", stage=i,
                         first=driver.first_member)
                driver.basis = driver.decision.output
                if i + 1 < len(drivers):
                    return i + 1
            elif i + 1 < len(drivers):
                drivers[i + 1].confirm()  # started on this stage's decided output
        return None


def stage_candidates(client: Any, model: SplitModel, first: int, last: int, servers: list[Any] | None = None) -> dict[str, Any]:
    """The stage's providers, as the client sees them now (trusted, past their trial), or
    among ``servers`` (the query's snapshot), with the record the directory holds for each."""
    records = client.directory.records
    if servers is None:
        servers = client.servers(model)
    else:  # a snapshot: a peer judged untrusted since it was taken (a liar caught at an earlier stage) is left out
        servers = [s for s in servers if client.reputation.trusted(s.peer_id)]
    peers = [s.peer_id for s in servers if s.first <= first and last <= s.last]
    return {p: records[p] for p in peers if p in records and records[p].envelope}


class TicketSession:
    """The client's ticket session (committee/5.0.0): a random session id, and each
    candidate's ticket on ``H(client_key, session)``, fetched once and used by every query
    until the session is renewed (``SESSION_MS``; ``MAX_TICKETS`` candidates remembered)."""

    SESSION_MS = 600_000
    MAX_TICKETS = 4096

    def __init__(self, client_key: bytes) -> None:
        self.client_key = client_key
        self.session = b""
        self.started_ms = 0
        self.tickets: dict[str, Ticket] = {}

    def current(self, now: int) -> bytes:
        if not self.session or now - self.started_ms > self.SESSION_MS or len(self.tickets) > self.MAX_TICKETS:
            self.session, self.started_ms, self.tickets = os.urandom(32), now, {}
        return self.session

    @property
    def seed(self) -> bytes:
        return ticket_seed(self.client_key, self.session)

    def forget(self, peer: str) -> None:
        self.tickets.pop(peer, None)


async def prefetch_tickets(client: Any, model: SplitModel, session: bytes, stages: list[tuple[int, int]],
                           servers: list[Any] | None = None) -> list[list[Ticket]]:
    """Every candidate's ticket for the session: those not held yet in one concurrent round,
    one request per peer however many stages it serves (each verified on the session's seed
    as it arrives, once per process; a ticket for another peer is dropped). A query in a
    session whose tickets are all held sends no ticket request. Once every stage holds k
    tickets the rest get TICKET_GRACE_MS, not the whole ticket timeout (a cut or starved
    candidate cost every query 3 s); a ticket that comes later serves the next queries."""
    wanted: dict[str, list[int]] = {}  # peer -> the stages it is a candidate of
    for i, (first, last) in enumerate(stages):
        for peer in stage_candidates(client, model, first, last, servers):
            wanted.setdefault(peer, []).append(i)
    found: list[list[Ticket]] = [[] for _ in stages]
    held = client.ticket_session
    seed = ticket_seed(client.identity.public_key, session)
    for peer, indices in list(wanted.items()):
        ticket = held.tickets.get(peer) if held.session == session else None
        if ticket is not None:
            for i in wanted.pop(peer):
                found[i].append(ticket)

    if not wanted:
        return found
    all_in, enough = trio.Event(), trio.Event()  # enough: every stage can draw a committee (or all are in)

    async def ask(peer: str, indices: list[int]) -> None:
        ticket = await fetch_ticket(client, model, seed, peer, stages[indices[0]])
        if ticket is None:
            return
        if held.session == session:
            held.tickets[peer] = ticket
        for i in indices:
            found[i].append(ticket)
        if all(len(f) >= client.committee for f in found):
            enough.set()

    async def ask_all() -> None:  # in the background: a ticket that comes late still enters the session
        async with trio.open_nursery() as nursery:
            for peer, indices in wanted.items():
                nursery.start_soon(ask, peer, indices)
        all_in.set()
        enough.set()

    spawn(client, ask_all)
    await enough.wait()
    if not all_in.is_set():  # the slow get a grace, not the whole ticket timeout
        with trio.move_on_after(TICKET_GRACE_MS / 1000):
            await all_in.wait()
    return [list(f) for f in found]  # copies: tickets arriving after this serve later queries only


async def fetch_ticket(client: Any, model: SplitModel, seed: bytes, peer: str, layers: tuple[int, int]) -> Ticket | None:
    """One candidate's session ticket, verified on the seed (remembered: ranking costs nothing more)."""
    first, last = layers  # the peer checks it serves the layers it is asked about
    message = TicketRequest(seed, model.model_id, first, last).to_wire()
    try:
        ticket = parse_ticket_reply(await committee_request(client, peer, message, TICKET_TIMEOUT_MS / 1000))
    except P2PInferError as exc:
        log.info("no ticket", peer=peer, reason=exc.message)
        return None
    if ticket.peer_id != peer:
        return None
    try:
        ticket.beta(seed)
    except ConsensusError as exc:
        log.info("bad ticket", peer=peer, reason=exc.message)
        return None
    return ticket


def stage_driver(client: Any, model: SplitModel, stage: int, layers: tuple[int, int], hidden: WireTensor,
                 mask: WireTensor | None, req_hash: bytes, judging: Judging, session: bytes, tickets: list[Ticket] | None = None,
                 servers: list[Any] | None = None) -> RoundDriver:
    """The stage's committee round (on no quorum it re-runs with a fresh committee, bounded)."""
    assert client.directory is not None and client.committee is not None
    first, last = layers
    commit_ms = int(client.commit_timeout * 1000)
    spec = StageSpec(req_hash, stage, model.model_id, model.name, first, last, activation_hash(hidden, mask), client.committee,
                     commit_timeout_ms=commit_ms, max_reruns=client.max_reruns, client=client.identity, session=session,
                     hedge_ms=client.hedges.hedge_ms(model.model_id, first, last, commit_ms), speculate=SPECULATE)
    return RoundDriver(client, model, CommitteeRound(spec), hidden, mask, judging, tickets, servers)


class RoundDriver:
    """Carries out one stage round's actions over the client's stream pool. The answers of
    an attempt are collected in the client's nursery: the stage returns at the first
    quorum, and the members still out are judged there when they answer or time out."""

    def __init__(self, client: Any, model: SplitModel, machine: CommitteeRound, hidden: WireTensor, mask: WireTensor | None,
                 judging: Judging, tickets: list[Ticket] | None = None, servers: list[Any] | None = None) -> None:
        self.client, self.model, self.machine = client, model, machine
        self.hidden, self.mask = hidden, mask
        self.judging = judging
        self.prefetched = tickets  # the first attempt's tickets, asked for with every other stage's
        self.servers = servers  # the query's snapshot of providers, for the first attempt (a re-run looks again)
        # the stage as the pipeline sees it (QueryStages): ready at the first valid answer or
        # the outcome, done at the outcome; basis: the output the next stage is started on
        self.ready, self.done, self.scope = trio.Event(), trio.Event(), trio.CancelScope()
        self.decision: StageDecision | None = None
        self.attempts = 0
        self.error: P2PInferError | None = None
        self.basis: WireTensor | None = None
        self.first_member = ""
        self.elapsed_ms = 0.0
        self.phase: AnswerPhase | None = None  # the current attempt's
        # judgements wait here while the input may still be a wrong first answer (None: confirmed)
        self.held: list[Judgement] | None = [] if machine.spec.stage > 0 else None

    def candidates(self) -> dict[str, Any]:
        servers = self.servers if self.machine.attempt < 0 else None
        return stage_candidates(self.client, self.model, self.machine.spec.first, self.machine.spec.last, servers)

    async def start(self) -> list[Action]:
        """Start an attempt; a record issued under MIN_RECORD_AGE_MS ago is waited for (once,
        at most that long): listed now, every member would refuse the candidate set."""
        found = self.candidates()
        young = [r.issued_at_ms + MIN_RECORD_AGE_MS - now_ms() for r in found.values()]
        if young and max(young) > 0:
            await trio.sleep(min(max(young), MIN_RECORD_AGE_MS) / 1000 + 0.001)
            found = self.candidates()
        tickets, self.prefetched = (self.prefetched if self.machine.attempt < 0 else None), None
        return self.machine.start(now_ms(), {p: r.envelope for p, r in found.items()}, tickets)

    async def conclude(self) -> None:
        """Run the round to its decision (or error), for the pipeline; cancelled when abandoned."""
        started = time.perf_counter()
        try:
            with self.scope:
                self.decision, self.attempts = await self.run()
                if self.basis is None:
                    self.basis = self.decision.output
        except P2PInferError as exc:
            self.error = exc
        finally:
            self.elapsed_ms = (time.perf_counter() - started) * 1000
            self.ready.set()
            self.done.set()

    def abandon(self) -> None:
        """Started on an input that was not the decided one: stop, and judge nobody (what the
        members computed was asked for in error; the third member is not asked at all)."""
        self.held = []  # whatever was judged meanwhile is dropped
        self.scope.cancel()
        if self.phase is not None:
            self.phase.abandoned.cancel()

    def provisional(self, action: Provisional) -> None:
        """The stage's first valid answer: the next stage may start on it."""
        if self.basis is None:
            self.basis, self.first_member = action.output, action.member
            self.ready.set()

    async def run(self) -> tuple[StageDecision, int]:
        queue: deque[Action] = deque(await self.start())
        while queue:
            action = queue.popleft()
            if isinstance(action, Decided):
                return action.decision, action.attempts  # judged already, or later in the background
            if isinstance(action, Failed):
                raise action.error
            queue.extend(await self.perform(action))
        raise AssertionError("the committee round stopped without an outcome")

    async def perform(self, action: Action) -> list[Action]:
        if isinstance(action, Rerun):
            return await self.start()
        if isinstance(action, AskTickets):
            return await self.exchange(action.peers, action.request.to_wire(), action.deadline_ms, self.on_ticket)
        if isinstance(action, SendExecute):
            assert self.machine.round is not None
            # our own set: the auditor need not re-verify every ticket on the critical path
            self.client.auditor.remember_committee(action.candidates, tuple(self.machine.round.members))
            return await self.answers(action)
        raise AssertionError(f"unexpected committee action {action!r}")

    def settle(self, actions: list[Action], judged: trio.Event) -> list[Action]:
        """What is done at once, wherever the actions arise: commits to the auditor, and
        judgements applied (``judged`` set once this attempt's is); the rest (the round's
        next step) is returned."""
        out = []
        for action in actions:
            if isinstance(action, ObserveCommit):
                try:  # a member's words: whatever the auditor refuses must not end the query (or the client)
                    publish_evidence(self.client, self.client.auditor.on_commit(action.commit, action.candidates))
                except ConsensusError as exc:
                    log.info("commit not audited", member=action.commit.member, reason=exc.message)
                continue
            judgement = action.judgement if isinstance(action, (Decided, Judged, Rerun, Failed)) else None
            if judgement is not None:
                self.judged(judgement)
            if isinstance(action, (Judged, Rerun, Failed)) or (isinstance(action, Decided) and judgement is not None):
                judged.set()
            if not isinstance(action, Judged):
                out.append(action)
        return out

    async def exchange(self, peers: tuple[str, ...], message: Message, deadline_ms: int, feed: Feed) -> list[Action]:
        """The ticket phase: ask every peer at once and feed each answer to the machine.
        Requests end by their own timeout at the phase deadline (a pooled stream must never
        be cancelled mid-reply), so the phase ends when all have answered or timed out."""
        timeout = max(0.0, (deadline_ms - now_ms()) / 1000)
        out: list[Action] = []

        async def ask(peer: str) -> None:
            try:
                actions = feed(peer, await committee_request(self.client, peer, message, timeout))
            except P2PInferError as exc:  # a timeout is silence (asked again, longer), not a refusal
                actions = self.machine.on_failure(peer, exc.message, now_ms(), timed_out=isinstance(exc, PeerTimedOut))
            out.extend(actions)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        return out or self.machine.poll(max(now_ms(), deadline_ms))  # everyone timed out: the deadline has passed

    async def answers(self, send: SendExecute) -> list[Action]:
        """The task phase, in the background (:class:`AnswerPhase`); returns the round's next
        step (decided at the first quorum, or re-run / failed once all are in)."""
        phase = self.phase = AnswerPhase(self, send)
        self.judging.rounds.append(phase.judged)
        spawn(self.client, phase.run, send)
        await phase.ready.wait()
        return phase.outcome

    def on_ticket(self, peer: str, reply: Message) -> list[Action]:
        """A ticket asked for in the round (missing from the prefetch, or re-asked after a
        silence) enters the session cache like a prefetched one, once it ranks (verified)."""
        ticket = parse_ticket_reply(reply)
        actions = self.machine.on_ticket(peer, ticket, now_ms())
        held, spec = self.client.ticket_session, self.machine.spec
        if ticket.peer_id == peer and held.session == spec.session and held.session and ticket in self.machine.tickets:
            try:
                ticket.beta(held.seed)  # the session's seed: only a ticket valid for it is kept
            except ConsensusError:
                return actions
            held.tickets[peer] = ticket
        return actions

    def judged(self, judgement: Judgement) -> None:
        """Reputation for one task, the verdicts for this query's gossip, and the evidence;
        held while the stage's input is not confirmed (dropped if it is abandoned)."""
        if self.held is not None:
            self.held.append(judgement)
            return
        self._apply(judgement)

    def confirm(self) -> None:
        """The stage's input is its predecessor's decided output: its judgements count."""
        held, self.held = self.held, None
        for judgement in held or []:
            self._apply(judgement)

    def _apply(self, judgement: Judgement) -> None:
        client = self.client
        evidence = apply_judgement(judgement, client.reputation, client.auditor, client.identity.peer_id)
        self.judging.records.append(judgement.record())  # gossiped once per query
        publish_evidence(client, evidence)


class AnswerPhase:
    """One attempt's task phase, in the client's nursery. The quorum is asked first; the
    members the machine releases later are asked then (an audit release once the query's
    answer is out, at most half the commit window later); the hedge is polled on time; the
    attempt's final poll and ``judged`` come once every request has ended."""

    def __init__(self, driver: RoundDriver, send: SendExecute) -> None:
        self.driver, self.machine = driver, driver.machine
        self.attempt = self.machine.attempt
        self.message = ExecuteRequest(send.candidates, driver.hidden, driver.mask).to_wire()
        self.deadline_ms = send.deadline_ms
        self.sent_ms = now_ms()
        self.outcome: list[Action] = []
        self.ready, self.judged = trio.Event(), trio.Event()
        self.hedging = trio.CancelScope()
        self.abandoned = trio.CancelScope()  # the stage was started on a wrong first answer: nobody is judged
        self.nursery: trio.Nursery | None = None

    def current(self) -> bool:
        # after a Rerun the machine is in the next attempt: this attempt's late failures
        # and its final poll (at this deadline, past the new ticket deadline) must not
        # reach it, or they close the new ticket phase short ("N eligible candidates")
        return self.machine.attempt == self.attempt

    async def run(self, first: SendExecute) -> None:
        try:
            with self.abandoned:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self.send(first)
                if self.current():
                    self.take(self.machine.poll(max(now_ms(), self.deadline_ms)))  # all in or timed out
        finally:
            if not self.ready.is_set():  # never leave the stage waiting (cancelled at shutdown, or a bug)
                self.take([Failed(NoQuorum(f"{self.machine.spec.layers}: the answers could not be collected"))])
            self.judged.set()

    def take(self, actions: list[Action]) -> None:
        for action in self.driver.settle(actions, self.judged):
            if isinstance(action, SendExecute):
                self.send(action)
            elif isinstance(action, Provisional):
                self.driver.provisional(action)
            else:
                if isinstance(action, Decided):
                    self.driver.client.hedges.observe(self.machine.spec, now_ms() - self.sent_ms)
                self.outcome.append(action)
        if not self.machine.held:
            self.hedging.cancel()  # nobody is held back any more: no hedge to wait for
        if self.outcome:
            self.ready.set()

    def send(self, action: SendExecute) -> None:
        assert self.nursery is not None
        if action.hedge_at_ms is not None:
            self.nursery.start_soon(self.hedge, action.hedge_at_ms)
        for peer in action.members:
            self.nursery.start_soon(self.ask, peer, action.audit)

    async def hedge(self, at_ms: int) -> None:
        with self.hedging:
            await trio.sleep(max(0.0, (at_ms - now_ms()) / 1000))
            if self.current():
                self.take(self.machine.poll(now_ms()))  # no quorum yet: the held members are asked

    async def ask(self, peer: str, audit: bool) -> None:
        if audit:  # only to be judged: off the query's critical path
            with trio.move_on_after(self.driver.client.commit_timeout / 2):
                await self.driver.judging.answered.wait()
        timeout = max(0.0, (self.deadline_ms - now_ms()) / 1000)
        try:
            reply = await committee_request(self.driver.client, peer, self.message, timeout)
            actions = self.machine.on_answer(peer, parse_result_reply(reply), now_ms()) if self.current() else []
        except P2PInferError as exc:
            actions = self.machine.on_failure(peer, exc.message, now_ms()) if self.current() else []
        self.take(actions)


def publish_evidence(client: Any, evidence: list[Evidence]) -> None:
    """The one place the client gossips fault evidence (off the critical path)."""
    for item in evidence:
        client._publish(evidence_message(item))


async def committee_request(client: Any, peer_id: str, message: Message, timeout: float) -> Message:
    assert client.pool is not None
    return await client.pool.request(peer_id, COMMITTEE_PROTOCOL, message, timeout=timeout)
