"""One query in the discrete-event model, driven through the real machines: plain and
spot-checked queries through ``proto.query.QueryMachine``, committee stages through
``proto.committee_round.CommitteeRound`` against each member's ``MemberCore``, verdicts
through ``apply_judgement`` into the client's reputation table and auditor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import NoRoute, P2PInferError
from ...proto import query as q
from ...proto.auditor import evidence_message
from ...proto.committee_codec import activation_hash, round_message, verdicts_message
from ...proto.committee_round import (
    TICKET_TIMEOUT_MS,
    AskTickets,
    CommitteeRound,
    Decided,
    Judged,
    Failed,
    ObserveCommit,
    Rerun,
    SendExecute,
    StageSpec,
    apply_judgement,
)
from ...proto.consensus import output_hash, outputs_agree, request_hash
from ...proto.plan import QueryPlan
from ...proto.routing import plan_route
from ...testing import adversaries as adv
from .client import CANDIDATE_BYTES, REQUEST_BYTES, SimClient
from .world import HIDDEN, MODEL_ID, SimPeer, as_process, honest_layers, unwire, wire


@dataclass
class Outcome:
    ok: bool
    wrong: bool = False
    hops: int = 0
    retries: int = 0
    route: list[str] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)
    code: str = ""
    consensus_ms: float = 0.0


Done = Callable[[Outcome], None]


def query_input(rng: Any) -> np.ndarray:
    return np.asarray([[rng.uniform(-1, 1) for _ in range(HIDDEN)]], dtype=np.float32)


class PlainQuery:
    """``QueryMachine`` over the modelled network: hops, failover, spot checks, reputation."""

    def __init__(self, client: SimClient, plan: QueryPlan, hidden: np.ndarray, done: Done) -> None:
        sc = client.world.sc
        self.client, self.done, self.hidden = client, done, hidden
        self.n_layers = sc.model.layers
        self.truth = honest_layers(hidden, plan.local_layers, self.n_layers - 1)
        self.machine = q.QueryMachine(plan, sc.name, self.n_layers, wire(hidden), client.servers(), client.rng,
                                      reputation=client.reputation.of, min_reputation=client.reputation.threshold,
                                      timeout=sc.load.request_timeout_s)

    def start(self) -> None:
        self.apply(self.machine.start(self.client.loop.now_ms / 1000))

    def apply(self, actions: list[Any]) -> None:
        loop = self.client.loop
        for action in actions:
            if isinstance(action, q.SendHop):
                self.send(action)
            elif isinstance(action, q.RefreshDirectory):
                self.client.refresh(lambda: self.apply(self.machine.on_servers(self.client.servers(), loop.now_ms / 1000)))
            elif isinstance(action, q.Arbitrate):  # the client's own weights settle a disagreement
                truth = honest_layers(unwire(action.activation), action.first, action.last)
                self.apply(self.machine.on_arbitration(wire(truth), loop.now_ms / 1000))
            elif isinstance(action, q.Record):
                self.client.reputation.record(action.peer_id, fault=action.fault)
            elif isinstance(action, q.Done):
                wrong = not outputs_agree(action.output, wire(self.truth))
                self.done(Outcome(True, wrong, len(action.hops), len(action.failed), [h.peer_id for h in action.hops]))
            elif isinstance(action, q.Failed):
                self.done(Outcome(False, code=getattr(action.error, "code", "failed"), retries=len(self.machine.failed)))

    def send(self, hop: q.SendHop) -> None:
        client, loop = self.client, self.client.loop
        peer = client.world.by_id[hop.peer_id]
        nbytes = REQUEST_BYTES + 4 * HIDDEN * 8
        client.messages["forward"] += 1
        if not peer.alive:
            loop.after(client.world.sc.network.dial_timeout_ms, self.fail, hop.request_id, "unreachable")
            return
        arrive = loop.now_ms + client.one_way_ms(peer, nbytes)
        finish = client.compute_at(peer, arrive, hop.last - hop.first + 1)
        loop.at(finish + client.one_way_ms(peer, nbytes), self.reply, hop, peer, loop.now_ms)
        loop.at(hop.deadline * 1000, self.poll)

    def reply(self, hop: q.SendHop, peer: SimPeer, sent_ms: float) -> None:
        now = self.client.loop.now_ms
        if not peer.alive:
            return self.fail(hop.request_id, "connection reset")
        out = peer.plain_output(unwire(hop.activation), hop.first, hop.last, self.client.peer_id)
        self.client.throughput.observe(peer.peer_id, hop.last - hop.first + 1, now - sent_ms, 2 * self.client.world.latency_ms(self.client.xy, peer.xy))
        self.apply(self.machine.on_reply(hop.request_id, wire(out), now / 1000))

    def fail(self, request_id: str, reason: str) -> None:
        self.apply(self.machine.on_failure(request_id, q.HopFailure(reason), self.client.loop.now_ms / 1000))

    def poll(self) -> None:
        self.apply(self.machine.poll(self.client.loop.now_ms / 1000))


class CommitteeQuery:
    """The route's stages one after the other, each a ``CommitteeRound`` (``StageRun``)."""

    def __init__(self, client: SimClient, hidden: np.ndarray, done: Done) -> None:
        sc = client.world.sc
        self.client, self.done, self.hidden = client, done, hidden
        self.truth = honest_layers(hidden, 1, sc.model.layers - 1)
        nonce = client.rng.getrandbits(256).to_bytes(32, "big")
        self.req_hash = request_hash(MODEL_ID, output_hash(wire(hidden)), b"", nonce, client.identity.public_key)
        self.outcome = Outcome(True)
        self.segments: list[tuple[int, int]] = []
        self.started_ms = client.loop.now_ms
        self.records: list[dict[str, Any]] = []  # each judged stage's verdicts: gossiped once, when the query ends
        self.finished = False
        self.unjudged = 0  # stages decided at the first quorum whose late members are not judged yet
        self.session = client.current_session()
        self.chosen: list[dict[str, bytes]] = []  # each stage's first-attempt candidates, drawn when the query starts
        self.waiting: set[str] = set()  # tickets asked for in this query's prefetch, not in yet
        self.prefetching = False

    def finish(self) -> None:
        self.finished = True
        self.publish_verdicts()
        self.done(self.outcome)

    def publish_verdicts(self) -> None:
        """Once per query, when every member is judged (as node/committee_client.publish_verdicts)."""
        gossip = self.client.world.gossip
        if self.finished and not self.unjudged and self.records and gossip is not None:
            gossip.publish(self.client.peer_id, verdicts_message(self.client.peer_id, self.records))
            self.records = []

    def start(self) -> None:
        try:
            route = plan_route(self.client.servers(shape_only=True), 1, self.client.world.sc.model.layers - 1)
        except NoRoute as exc:
            self.done(Outcome(False, code=exc.code))
            return
        self.segments = [(s.first, s.last) for s in route]
        self.chosen = [pick_candidates(self.client, first, last, set()) for first, last in self.segments]
        self.prefetch()

    def prefetch(self) -> None:
        """Every candidate's ticket not held yet for the session, in one concurrent round, one
        request per peer (as ``node/committee_client.prefetch_tickets``); with all held, none."""
        client, loop = self.client, self.client.loop
        seed = client.ticket_seed
        self.waiting = {p for chosen in self.chosen for p in chosen if p not in client.tickets}
        if not self.waiting:
            return self.next_stage(self.hidden)
        self.prefetching = True
        for peer_id in sorted(self.waiting):
            peer = client.world.by_id[peer_id]
            client.messages["ticket"] += 1
            if not peer.alive:
                loop.after(min(client.world.sc.network.dial_timeout_ms, TICKET_TIMEOUT_MS), self.got_ticket, peer_id, None)
                continue
            assert peer.core is not None
            ticket, cost = client.timed(peer.core.ticket, seed, owner=peer)
            loop.after(2 * client.one_way_ms(peer, REQUEST_BYTES) + cost, self.got_ticket, peer_id, ticket)
        loop.after(TICKET_TIMEOUT_MS, self.prefetch_done)

    def got_ticket(self, peer_id: str, ticket: Any) -> None:
        if not self.prefetching or peer_id not in self.waiting:
            return
        self.waiting.discard(peer_id)
        if ticket is None:
            self.client.tickets.pop(peer_id, None)  # unreachable: asked again by the next query
        elif self.session == self.client.session:
            self.client.tickets[peer_id] = ticket
        if not self.waiting:
            self.prefetch_done()

    def prefetch_done(self) -> None:
        if self.prefetching:
            self.prefetching = False
            self.next_stage(self.hidden)

    def next_stage(self, hidden: np.ndarray) -> None:
        stage = self.outcome.hops
        if stage == len(self.segments):
            self.outcome.wrong = not outputs_agree(wire(hidden), wire(self.truth))
            self.outcome.consensus_ms = self.client.loop.now_ms - self.started_ms
            return self.finish()
        first, last = self.segments[stage]
        StageRun(self, stage, first, last, hidden).start(self.chosen[stage])

    def stage_done(self, decided: Any) -> None:
        self.outcome.hops += 1
        self.outcome.verdicts.update(decided.decision.verdicts)
        self.outcome.route += [m for m, v in decided.decision.verdicts.items() if v == "agree"]
        self.outcome.retries += decided.attempts - 1
        self.next_stage(unwire(decided.decision.output))

    def stage_failed(self, error: P2PInferError) -> None:
        self.outcome.ok, self.outcome.code = False, error.code
        self.finish()


class StageRun:
    def __init__(self, query: CommitteeQuery, stage: int, first: int, last: int, hidden: np.ndarray) -> None:
        client, sc = query.client, query.client.world.sc
        self.query, self.client, self.first, self.last = query, client, first, last
        self.hidden = wire(hidden)
        spec = StageSpec(query.req_hash, stage, MODEL_ID, sc.name, first, last, activation_hash(self.hidden, None), sc.load.committee,
                         commit_timeout_ms=int(sc.load.commit_timeout_s * 1000), max_reruns=sc.load.max_reruns, client=client.identity,
                         session=query.session)
        self.machine = CommitteeRound(spec)

    def start(self, chosen: dict[str, bytes] | None = None) -> None:
        """An attempt: the first with the query's prefetched tickets (the ticket phase is
        skipped when k are held), a re-run with fresh candidates and a ticket round."""
        client = self.client
        candidates = chosen if chosen is not None else pick_candidates(client, self.first, self.last, self.machine.excluded)
        tickets = [client.tickets[p] for p in candidates if p in client.tickets] if chosen is not None else None
        actions, cost = client.timed(self.machine.start, int(client.loop.now_ms), candidates, tickets)
        client.loop.after(cost, self.apply, actions)

    def apply(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, AskTickets):
                self.ask_tickets(action)
            elif isinstance(action, SendExecute):
                self.execute(action)
            elif isinstance(action, ObserveCommit):
                self.client.auditor.on_commit(action.commit, action.candidates)
            elif isinstance(action, Decided):  # at the first quorum: the rest is judged later (Judged)
                if action.judgement is not None:
                    self.judge(action.judgement)
                else:
                    self.query.unjudged += 1
                self.query.stage_done(action)
            elif isinstance(action, Judged):
                self.judge(action.judgement)
                self.query.outcome.verdicts.update(action.decision.verdicts)  # the "pending" ones, now judged
                self.query.unjudged -= 1
                self.query.publish_verdicts()
            elif isinstance(action, Rerun):
                self.judge(action.judgement)
                self.start()
            elif isinstance(action, Failed):
                if action.judgement is not None:
                    self.judge(action.judgement)
                self.query.stage_failed(action.error)

    def judge(self, judgement: Any) -> None:
        """Score the members; gossip the verified evidence and keep the stage's verdicts for the query's gossip."""
        client = self.client
        evidence = apply_judgement(judgement, client.reputation, client.auditor, client.peer_id)
        self.query.records.append(judgement.record())
        gossip = client.world.gossip
        if gossip is not None:
            for item in evidence:
                gossip.publish(client.peer_id, evidence_message(item))

    def feed(self, attempt: int, event: Callable[..., list[Any]], *args: Any) -> None:
        if attempt != self.machine.attempt:
            return  # an answer to an earlier attempt: the real driver's requests end with their phase
        actions, cost = self.client.timed(event, *args, int(self.client.loop.now_ms))
        self.client.loop.after(cost, self.apply, actions) if cost > 0.05 else self.apply(actions)

    def poll(self, attempt: int) -> None:
        self.feed(attempt, self.machine.poll)

    def ask_tickets(self, ask: AskTickets) -> None:
        loop, attempt = self.client.loop, self.machine.attempt
        for peer_id in ask.peers:
            peer = self.client.world.by_id[peer_id]
            self.client.messages["ticket"] += 1
            if peer.alive:
                assert peer.core is not None
                ticket, cost = self.client.timed(peer.core.ticket, ask.request.seed, owner=peer)
                rtt = 2 * self.client.one_way_ms(peer, REQUEST_BYTES)
                loop.after(rtt + cost, self.on_ticket, attempt, peer_id, ticket)
            else:
                self.unreachable(attempt, peer_id)
        loop.at(ask.deadline_ms, self.poll, attempt)

    def on_ticket(self, attempt: int, peer_id: str, ticket: Any) -> None:
        """A ticket asked for in the round enters the session's tickets too (as RoundDriver.on_ticket)."""
        if self.machine.spec.session == self.client.session:
            self.client.tickets[peer_id] = ticket
        self.feed(attempt, self.machine.on_ticket, peer_id, ticket)

    def execute(self, send: SendExecute) -> None:
        loop, attempt = self.client.loop, self.machine.attempt
        nbytes = REQUEST_BYTES + 4 * HIDDEN + CANDIDATE_BYTES * len(send.candidates.candidates)
        assert self.machine.round is not None  # our own set, as the real driver (the whole committee, held members too)
        self.client.auditor.remember_committee(send.candidates, tuple(self.machine.round.members))
        for peer_id in send.members:
            self.client.messages["execute"] += 1
            peer = self.client.world.by_id[peer_id]
            if peer.alive:
                arrive = loop.now_ms + self.client.one_way_ms(peer, nbytes)
                loop.at(arrive, self.member_runs, attempt, peer, send)
            else:
                self.unreachable(attempt, peer_id)
        if send.hedge_at_ms is not None:  # quorum first: the rest is asked then if no quorum has formed
            loop.at(send.hedge_at_ms, self.poll, attempt)
        loop.at(send.deadline_ms, self.poll, attempt)

    def unreachable(self, attempt: int, peer_id: str) -> None:
        self.client.tickets.pop(peer_id, None)  # asked for a fresh ticket before it is drawn again
        delay = self.client.world.sc.network.dial_timeout_ms
        self.client.loop.after(delay, self.feed, attempt, self.machine.on_failure, peer_id, "unreachable")

    def member_runs(self, attempt: int, peer: SimPeer, send: SendExecute) -> None:
        """The member checks the task (the candidate set's VRF proofs and records), computes, commits, answers."""
        loop, core = self.client.loop, peer.core
        assert core is not None
        try:
            _, check_ms = self.client.timed(core.check_execute, send.candidates, send.task.input_hash, self.client.peer_id, int(loop.now_ms), owner=peer)
        except P2PInferError as exc:  # the member refuses with an error reply: silent for this phase
            back = self.client.one_way_ms(peer, REQUEST_BYTES)
            loop.after(back, self.feed, attempt, self.machine.on_failure, peer.peer_id, exc.message)
            return
        done = self.client.compute_at(peer, loop.now_ms, self.last - self.first + 1, check_ms)
        if peer.fault == "late-commit":
            done = max(done, send.task.commit_deadline_ms + adv.LATE_BY_S * 1000)
        output = wire(peer.committee_output(unwire(self.hidden), self.first, self.last))
        nonce = self.client.rng.getrandbits(256).to_bytes(32, "big")
        loop.at(done, self.member_answers, attempt, peer, send, output, nonce)

    def member_answers(self, attempt: int, peer: SimPeer, send: SendExecute, output: dict[str, Any], nonce: bytes) -> None:
        if not peer.alive:
            return
        assert peer.core is not None
        with as_process(peer):
            answer = peer.core.answer(send.candidates, output, nonce, int(self.client.loop.now_ms), reveal=peer.fault != "no-reveal")
        back = self.client.one_way_ms(peer, REQUEST_BYTES + 4 * HIDDEN)
        self.client.loop.after(back, self.feed, attempt, self.machine.on_answer, peer.peer_id, answer)
        gossip = self.client.world.gossip
        if gossip is not None and answer.reveal is not None:  # the round, for audit, only after the commit deadline
            def publish_round(message: dict[str, Any]) -> None:  # batched with the member's other rounds (topic v5)
                gossip.publish_round(peer.peer_id, message)

            sender = adv.equivocating(publish_round, peer.identity) if peer.fault == "equivocate" else publish_round
            message = round_message(send.candidates, answer.commit, answer.reveal)
            self.client.loop.at(max(self.client.loop.now_ms, send.task.commit_deadline_ms), sender, message)


def pick_candidates(client: SimClient, first: int, last: int, excluded: set[str]) -> dict[str, bytes]:
    """Trusted providers of these layers from the directory, at most ``des.candidates`` of them."""
    pool = sorted({i for si, (f, l) in enumerate(client.world.shards) if f <= first and last <= l
                   for i in client.directory.get(si, ())})
    peers = [client.world.peers[i] for i in pool]
    # a peer never met has R = 1; only met ones can be distrusted or excluded
    peers = [p for p in peers if client.admitted(p) and (not p.known or (client.reputation.trusted(p.peer_id) and p.peer_id not in excluded))]
    chosen = client.rng.sample(peers, min(client.world.sc.des.candidates, len(peers)))
    return {p.peer_id: p.record for p in chosen}
