"""Trial tasks in the discrete-event model, through the real ``proto.trial.Admission``: it
plans each query's trials (every untried provider once, gating the query when it cannot
run without them; each admitted one again with probability ``retrial``, at a drawn moment
among the live traffic), the client builds the known answer with its own (modelled)
weights, the peer answers as its plain forward path does (``SimPeer.plain_output``: a
lie-after-trial peer is honest on its first request from a client, then lies), and
``Admission.on_reply`` judges it. Only admitted providers carry live traffic
(``des.trial = false``: everyone is admitted at once, as before).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...proto.query import HopFailure, Record, SendHop
from ...proto.trial import Admit, Provider, TrialSpec, TrialTask
from .client import REQUEST_BYTES, SimClient
from .queries import query_input
from .world import HIDDEN, SimPeer, honest_layers, wire


@dataclass
class TrialStats:
    sent: int = 0
    passed: int = 0
    failed: int = 0  # a wrong answer (the peer is out)
    unanswered: int = 0
    gating: int = 0  # trials a query waited for


def providers_of(client: SimClient) -> list[SimPeer]:
    """The directory's providers this query's trials may cover: every one already met, and per
    shard up to ``des.candidates`` not yet met, drawn at random. The real client plans a trial
    for every untried provider in its directory at once; at 10,000 peers that is thousands of
    identities to make (0.16 CPU-s each) in the first query, so the model admits the directory
    at most ``des.candidates`` new providers per shard per query (all of it, over the run)."""
    out: list[SimPeer] = []
    want = client.world.sc.des.candidates
    for si in sorted(client.directory):
        peers = [client.world.peers[i] for i in sorted(client.directory[si])]
        met = [p for p in peers if p.known]
        unmet = [p for p in peers if not p.known]
        out += met + client.rng.sample(unmet, min(len(unmet), want))
    return out


def admitted_enough(client: SimClient, need: int) -> bool:
    """Whether every shard has ``need`` admitted, trusted providers (then new ones need not hold a query up)."""
    for si in range(len(client.world.shards)):
        peers = [client.world.peers[i] for i in client.directory.get(si, ())]
        if sum(1 for p in peers if p.known and client.admission.admitted(p.peer_id) and client.reputation.trusted(p.peer_id)) < need:
            return False
    return True


def trials_for_query(client: SimClient, need: int, then: Callable[[], None]) -> None:
    """Plan this query's trials; run ``then`` once the gating ones are judged (at once if none)."""
    peers = [p for p in providers_of(client) if client.reputation.trusted(p.peer_id)]
    specs = client.admission.plan([Provider(p.peer_id, p.first, p.last) for p in peers], remote_first=1,
                                  n_layers=client.world.sc.model.layers, tokens=0, gate_untried=not admitted_enough(client, need))
    gating = [s for s in specs if s.gating]
    client.trials.gating += len(gating)
    waiting = [len(gating)]

    def one_gating_done() -> None:
        waiting[0] -= 1
        if waiting[0] == 0:
            then()

    for spec in specs:
        if spec.gating:
            send_trial(client, spec, one_gating_done)
        else:
            client.loop.after(spec.delay * 1000, send_trial, client, spec, None)
    if not gating:
        then()


def send_trial(client: SimClient, spec: TrialSpec, done: Callable[[], None] | None) -> None:
    loop, peer = client.loop, client.world.by_id[spec.peer_id]
    x = query_input(client.rng)
    task = TrialTask(spec.peer_id, spec.first, spec.last, wire(x), wire(honest_layers(x, spec.first, spec.last)), session=spec.session)
    [send] = client.admission.start([task], loop.now_ms / 1000)
    client.messages["trial"] += 1
    client.trials.sent += 1
    if not peer.alive:
        loop.after(client.world.sc.network.dial_timeout_ms, _failed, client, send, done)
        return
    nbytes = REQUEST_BYTES + 4 * HIDDEN * 8
    finish = client.compute_at(peer, loop.now_ms + client.one_way_ms(peer, nbytes), spec.last - spec.first + 1)
    loop.at(finish + client.one_way_ms(peer, nbytes), _reply, client, send, peer, x, done)


def _reply(client: SimClient, send: SendHop, peer: SimPeer, x: object, done: Callable[[], None] | None) -> None:
    if not peer.alive:
        return _failed(client, send, done)
    out = peer.plain_output(x, send.first, send.last, client.peer_id)  # type: ignore[arg-type]
    for action in client.admission.on_reply(send.request_id, wire(out), client.loop.now_ms / 1000):
        if isinstance(action, Record):
            client.reputation.record(action.peer_id, fault=action.fault)
            client.trials.failed += action.fault
        elif isinstance(action, Admit):
            client.trials.passed += 1
    if done is not None:
        done()


def _failed(client: SimClient, send: SendHop, done: Callable[[], None] | None) -> None:
    client.admission.on_failure(send.request_id, HopFailure("unreachable"), client.loop.now_ms / 1000)
    client.trials.unanswered += 1
    if done is not None:
        done()
