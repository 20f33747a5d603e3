"""``engine = "des"``: the discrete-event run. Builds the world, starts the light clients,
schedules Poisson query arrivals (at most ``concurrency`` in flight per client), churn
(the process engine's kill schedule, plus a Poisson leave rate) and reputation samples,
then runs the event queue and turns what happened into a :class:`RunData`.
"""

from __future__ import annotations

import inspect
import random
import statistics
import sys
import time
from collections import Counter, deque
from typing import Any

import structlog

from ...proto.kademlia import RoutingTable, node_id
from ...proto.plan import QueryPlan
from ..identities import IdentityPool
from ..modes import MODES
from ..process_engine import Churn, plan_peers
from ..record import QueryOutcome, RunData, RunEvent
from ..report import percentiles
from ..scenario import Scenario
from .client import SimClient
from .queries import CommitteeQuery, Outcome, PlainQuery, query_input
from .trials import trials_for_query
from .world import EPOCH_MS, World, build_world, neighbours

log = structlog.get_logger("p2p_infer.sim.des")
REPUTATION_SAMPLE_S = 5.0
REFRESH_S = 10.0
DES_MODES = ("plain", "spot-check", "committee")


class DesRun:
    def __init__(self, sc: Scenario, progress: bool = True, pool: IdentityPool | None = None) -> None:
        self.sc, self.progress = sc, progress
        self.rng = random.Random(sc.seed)
        self.pool = pool or IdentityPool()
        self.data = RunData(sc, planned=sc.load.queries)
        self.world: World | None = None
        self.clients: list[SimClient] = []
        self.waiting: list[deque[int]] = []
        self.in_flight: list[int] = []
        self.arrived = 0
        self.finished = 0
        self.wall0 = 0.0
        self.last_shown = 0.0
        from .world import EventLoop

        self.loop = EventLoop(EPOCH_MS)
        self.load_start_ms = float(EPOCH_MS)

    # ---- set-up ----

    def build(self) -> None:
        from ...errors import ScenarioError

        if self.sc.load.mode not in DES_MODES or self.sc.load.mode not in MODES:
            raise ScenarioError(f"load.mode {self.sc.load.mode!r} is not modelled by engine = \"des\"; it models {', '.join(DES_MODES)}")
        had = len(self.pool)
        self.world = world = build_world(self.sc, self.pool, self.rng)
        ids = sorted(world.by_nid)
        for c in range(self.sc.load.clients):
            identity = world.next_identity()
            nid = node_id(identity.peer_id)
            table = RoutingTable(nid, self.sc.des.kademlia_k)
            for other in neighbours(nid, ids, self.sc.des.kademlia_k, self.rng):
                table.add(other)
            spread = self.sc.network.spread_ms
            xy = (self.rng.uniform(0, spread), self.rng.uniform(0, spread))
            self.clients.append(SimClient(c, identity, xy, world, self.loop, random.Random(self.sc.seed * 7919 + c), table))
        if self.sc.des.gossip:
            from .gossip import Gossip

            world.gossip = gossip = Gossip(world, self.loop, self.sc.des.gossip_degree)
            honest = [p for p in world.peers if not p.fault]
            gossip.add_peer_auditors(self.rng.sample(honest, min(self.sc.des.auditors, len(honest))))
            for client in self.clients:
                gossip.add_client(client)
        self.waiting = [deque() for _ in self.clients]
        self.in_flight = [0 for _ in self.clients]
        self.had_identities = had

    # ---- scheduling ----

    def schedule(self) -> None:
        loop, sc = self.loop, self.sc
        for client in self.clients:
            client.refresh()
            self._refresh_loop(client)
        t = loop.now_ms + sc.load.warmup_s * 1000 + 2000  # first refreshes done
        self.load_start_ms = t
        for i in range(sc.load.queries):
            t += self.rng.expovariate(sc.load.rate) * 1000
            loop.at(t, self.arrive, i)
        plans = plan_peers(sc, random.Random(sc.seed))
        for at, action, name in Churn.plan(sc, plans, random.Random(sc.seed)).steps:
            loop.at(self.load_start_ms + at * 1000, self.churn, action, int(name.removeprefix("peer")))
        if sc.churn.rate_per_s > 0:
            loop.at(self.load_start_ms + self.rng.expovariate(sc.churn.rate_per_s) * 1000, self.random_leave)
        loop.at(self.load_start_ms, self.sample_reputation)

    def _refresh_loop(self, client: SimClient) -> None:
        def again() -> None:
            if self.finished < self.sc.load.queries:
                client.refresh()
                self.loop.after(REFRESH_S * 1000, again)

        self.loop.after(REFRESH_S * 1000, again)

    def churn(self, action: str, index: int) -> None:
        assert self.world is not None
        peer = self.world.peers[index]
        t = (self.loop.now_ms - self.load_start_ms) / 1000
        if action == "kill":
            peer.alive = False
            self.data.events.append(RunEvent(t, "kill", f"peer{index}", peer.peer_id if peer.known else ""))
        else:
            peer.restarted(int(self.loop.now_ms))
            self.data.events.append(RunEvent(t, "ready", f"peer{index}", peer.peer_id if peer.known else ""))

    def random_leave(self) -> None:
        assert self.world is not None
        live = [p for p in self.world.peers if p.alive and not p.fault]
        if live and self.finished < self.sc.load.queries:
            peer = self.rng.choice(live)
            self.churn("kill", peer.index)
            self.loop.after(self.sc.churn.down_s * 1000, self.churn, "restart", peer.index)
            self.loop.after(self.rng.expovariate(self.sc.churn.rate_per_s) * 1000, self.random_leave)

    def sample_reputation(self) -> None:
        t = (self.loop.now_ms - self.load_start_ms) / 1000
        self.data.reputation.append((t, dict(self.clients[0].reputation.scores)))
        if self.finished < self.sc.load.queries:
            self.loop.after(REPUTATION_SAMPLE_S * 1000, self.sample_reputation)

    # ---- queries ----

    def arrive(self, i: int) -> None:
        c = i % len(self.clients)
        self.waiting[c].append(i)
        self.dispatch(c)

    def dispatch(self, c: int) -> None:
        while self.waiting[c] and self.in_flight[c] < self.sc.load.concurrency:
            i = self.waiting[c].popleft()
            self.in_flight[c] += 1
            self.start_query(c, i)

    def start_query(self, c: int, i: int) -> None:
        client, sc = self.clients[c], self.sc
        started = self.loop.now_ms
        hidden = query_input(client.rng)

        def done(outcome: Outcome) -> None:
            latency = self.loop.now_ms - started
            client.admission.on_query_done(latency / 1000)  # later trials are spread over this long
            self.data.queries.append(QueryOutcome(
                (started - self.load_start_ms) / 1000, outcome.ok, outcome.wrong and outcome.ok, latency, outcome.hops, outcome.retries,
                outcome.route, outcome.verdicts, outcome.code, f"client{c}", consensus_ms=outcome.consensus_ms))
            self.finished += 1
            self.in_flight[c] -= 1
            self.dispatch(c)

        if sc.des.trial:  # the trials it cannot run without first, the rest among the live traffic (des/trials.py)
            need = sc.load.committee if sc.load.mode == "committee" else 1
            trials_for_query(client, need, lambda: self.launch(client, hidden, done))
        else:
            self.launch(client, hidden, done)

    def launch(self, client: SimClient, hidden: Any, done: Any) -> None:
        sc = self.sc
        if sc.load.mode == "committee":
            CommitteeQuery(client, hidden, done).start()
            return
        options: dict[str, Any] = {"committee": None, "spot_check": 1.0 if sc.load.mode == "spot-check" else 0.0, "trial": False, "max_retries": 3}
        if sc.load.mode == "plain" and "unverified" in inspect.signature(QueryPlan.from_options).parameters:
            options["unverified"] = True  # committees became the default: a plain query says so
        plan = QueryPlan.from_options(**options).validate()
        PlainQuery(client, plan, hidden, done).start()

    # ---- run ----

    def run(self) -> RunData:
        self.wall0 = time.monotonic()
        self.build()
        built_s = time.monotonic() - self.wall0
        self.schedule()
        cap_ms = self.loop.now_ms + self.sc.duration_s * 1000
        while self.finished < self.sc.load.queries and self.loop.now_ms < cap_ms:
            if not self.loop.run_until(min(cap_ms, self.loop.now_ms + 1000)):
                break
            self.show()
        self.finish(built_s)
        return self.data

    def show(self, force: bool = False) -> None:
        wall = time.monotonic() - self.wall0
        if not self.progress or (not force and wall - self.last_shown < 5.0):
            return
        self.last_shown = wall
        failed = sum(1 for q in self.data.queries if not q.ok)
        rate = self.loop.processed / max(wall, 1e-9)
        sys.stderr.write(f"[{self.sc.name} des] virtual {(self.loop.now_ms - EPOCH_MS) / 1000:7.1f}s  wall {wall:6.1f}s  "
                         f"events {self.loop.processed} ({rate:,.0f}/s)  done {self.finished}/{self.sc.load.queries}  failed {failed}\n")
        sys.stderr.flush()

    def finish(self, built_s: float) -> None:
        self.show(force=True)
        assert self.world is not None
        known = [p for p in self.world.peers if p.known]
        for peer in known:  # the peers a client met: the rest never had an identity made
            self.data.roles[peer.peer_id] = peer.fault or "honest"
        self.data.extra.update(identities_used=len(known), identities_generated=max(0, len(self.pool) - self.had_identities))
        wall = time.monotonic() - self.wall0
        self.data.wall_s = wall
        self.data.queries.sort(key=lambda q: q.t0_s)
        hops = [h for c in self.clients for h in c.lookup_hops]
        lookup_ms = [m for c in self.clients for m in c.lookup_ms]
        consensus = [q.consensus_ms for q in self.data.queries if q.ok and q.consensus_ms]
        run_s = max(wall - built_s, 1e-9)
        self.data.extra.update({
            "events": self.loop.processed, "events_per_s": round(self.loop.processed / run_s),
            "build_s": round(built_s, 1), "virtual_s": round((self.loop.now_ms - EPOCH_MS) / 1000, 1),
            "dht_lookup_hops": percentiles([float(h) for h in hops], (50, 95)),
            "dht_lookup_ms": percentiles(lookup_ms, (50, 95)), "dht_lookups": len(hops),
            "consensus_ms": percentiles(consensus, (50, 95)),
            "mean_latency_ms": round(statistics.mean([q.latency_ms for q in self.data.queries if q.ok]), 2) if any(q.ok for q in self.data.queries) else None,
            "wrong_share": round(sum(q.wrong for q in self.data.queries) / max(1, len(self.data.queries)), 4),
            "processes_left_note": "the discrete-event engine starts no processes",
            "trials": {k: sum(getattr(c.trials, k) for c in self.clients) for k in ("sent", "passed", "failed", "unanswered", "gating")},
        })
        sent: Counter[str] = Counter()
        for c in self.clients:
            sent.update(c.messages)
        self.data.extra["client_requests"] = dict(sorted(sent.items()))  # tickets, executes, forwards, trials: what clients sent
        self.data.extra["client_requests_per_query"] = {k: round(v / max(1, len(self.data.queries)), 2) for k, v in sorted(sent.items())}
        if self.world.gossip is not None:
            self.data.extra["gossip"] = self.world.gossip.report(len(self.data.queries), self.data.roles)
        if self.finished < self.sc.load.queries:
            self.data.extra["note"] = (f"stopped at the duration cap ({self.sc.duration_s} virtual s) with "
                                       f"{self.sc.load.queries - self.finished} queries unfinished")
        log.info("des run finished", wall_s=round(wall, 1), events=self.loop.processed)
