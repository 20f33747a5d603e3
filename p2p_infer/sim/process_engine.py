"""``engine = "processes"``: real peer binaries as separate OS processes on loopback
(``testing.harness.Swarm``), light clients (``sim.loadgen``) driving the load, SIGKILL +
restart churn and joins on schedule, adversaries from ``--test-fault``.

Every process leads its own process group. Whatever happens (an error, Ctrl-C) the swarm is
stopped, and afterwards every group this run ever started is checked in /proc: the count of
processes still alive is the report's ``processes_left``.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ..errors import SimulationError
from ..testing.harness import Swarm
from .netns import NetnsLab
from .netreport import network_report
from .record import QueryOutcome, RunData, RunEvent
from .scenario import Scenario

log = structlog.get_logger("p2p_infer.sim")
POLL_S = 0.25


@dataclass
class PeerPlan:
    name: str
    shard: str
    fault: str = ""  # "" = honest


def plan_peers(sc: Scenario, rng: random.Random) -> list[PeerPlan]:
    """Peer i serves shards[i % len]; liars per shard (``count``) or spread at random (``share``)."""
    shards = sc.model.shards
    plans = [PeerPlan(f"peer{i}", f"{sc.model.name}:{shards[i % len(shards)]}") for i in range(sc.peers)]
    adv = sc.adversaries
    kinds = iter(adv.kinds * sc.peers)
    if adv.placement == "per-shard":
        for shard in shards:
            providers = [p for p in plans if p.shard.endswith(":" + shard)]
            if adv.count > len(providers):
                raise SimulationError(f"adversaries.count = {adv.count} but shard {shard} has {len(providers)} providers")
            for p in rng.sample(providers, adv.count):
                p.fault = next(kinds)
    else:
        for p in rng.sample(plans, round(adv.share * sc.peers)):
            p.fault = next(kinds)
    return plans


@dataclass
class Churn:
    """The schedule: (t, action, peer) sorted by time; victims honest, spread over shards."""

    steps: list[tuple[float, str, str]] = field(default_factory=list)

    @classmethod
    def plan(cls, sc: Scenario, plans: list[PeerPlan], rng: random.Random) -> Churn:
        honest = [p for p in plans if not p.fault]
        n = min(len(honest), math.ceil(sc.churn.kill * sc.peers - 1e-9))
        by_shard: dict[str, list[PeerPlan]] = {}
        for p in rng.sample(honest, len(honest)):
            by_shard.setdefault(p.shard, []).append(p)
        order = [p for group in zip(*by_shard.values()) for p in group] if by_shard else []
        order += [p for p in honest if p not in order]
        steps = []
        for j, p in enumerate(order[:n]):
            at = sc.churn.start_s + j * sc.churn.every_s
            steps += [(at, "kill", p.name), (at + sc.churn.down_s, "restart", p.name)]
        for j in range(sc.churn.joins):
            steps.append((sc.churn.join_at_s + j, "join", f"joiner{j}"))
        for j, part in enumerate(sc.network.partition):  # netns: cut a group off, then heal it
            steps += [(part.start_s, "partition", str(j)), (part.heal_s, "heal", str(j))]
        return cls(sorted(steps))


class ProcessRun:
    def __init__(self, sc: Scenario, out: Path, progress: bool = True) -> None:
        self.sc, self.out, self.progress = sc, out, progress
        self.rng = random.Random(sc.seed)
        self.plans = plan_peers(sc, self.rng)
        self.churn = Churn.plan(sc, self.plans, self.rng)
        self.groups: set[int] = set()
        self.data = RunData(sc, planned=sc.load.queries)
        self.t0 = 0.0
        self.clients: list[str] = []
        self.event_files: list[Path] = []
        self.pending_ready: dict[str, str] = {}  # restarted or joined, not yet ready -> event kind
        self.last_shown = -1e9
        self.lab: NetnsLab | None = NetnsLab(sc.network) if sc.network.mode == "netns" else None
        self.names: dict[str, str] = {}  # process name -> peer id (the network report maps rules to routes)

    def run(self) -> RunData:
        started = time.monotonic()
        try:
            if self.lab is not None:
                self.lab.open()  # refuses by name what this machine cannot do, before any process starts
            swarm = Swarm(self.out / "swarm", record_ttl=self.sc.record_ttl_s, place=self.lab.place if self.lab else None)
            try:
                self._start(swarm)
                self._drive(swarm)
                self.data.extra["client_exit_codes"] = {c: swarm.peers[c].proc.poll() for c in self.clients}
            finally:
                swarm.stop()
                self.data.processes_left = processes_left(self.groups)
                self.names.update({n: p.peer_id for n, p in swarm.peers.items() if p.info is not None})
        finally:
            if self.lab is not None:  # after the processes: a namespace with a process in it outlives its deletion
                self.lab.close()
                self.data.extra["netns_left"] = self.lab.leftovers()
            self.data.wall_s = time.monotonic() - started
        self._collect()
        if self.lab is not None:
            self.data.extra["network"] = network_report(self.sc, self.data, self.names)
        return self.data

    # ---- start ----

    def _track(self, swarm: Swarm) -> None:
        self.groups |= swarm.process_groups()

    def _start(self, swarm: Swarm) -> None:
        swarm.start_bootstrap()
        self._track(swarm)
        for p in self.plans:
            swarm.start_peer(p.name, [p.shard], extra_args=["--test-fault", p.fault] if p.fault else [], wait=False)
        self._track(swarm)
        swarm.wait_ready(list(swarm.peers.values()), timeout=300)
        swarm.wait_discoverable(timeout=120)
        for p in self.plans:
            self.data.roles[swarm.peers[p.name].peer_id] = p.fault or "honest"
        load = self.sc.load
        self.t0 = time.time()
        for c in range(load.clients):
            share = load.queries // load.clients + (1 if c < load.queries % load.clients else 0)
            events = self.out / f"client{c}.events.jsonl"
            events.unlink(missing_ok=True)
            self.event_files.append(events)
            args = ["--bootstrap", swarm.bootstrap.addr if swarm.bootstrap else "", "--out", str(events.resolve()),
                    "--model", self.sc.model.name, "--mode", load.mode, "--committee", str(load.committee),
                    "--commit-timeout", str(load.commit_timeout_s), "--optimistic", str(load.optimistic), "--max-reruns", str(load.max_reruns),
                    "--request-timeout", str(load.request_timeout_s), "--queries", str(share),
                    "--offset", str(c * 100_000), "--rate", str(load.rate / load.clients),
                    "--concurrency", str(load.concurrency), "--seed", str(self.sc.seed * 1000 + c)]
            swarm.start_tool(f"client{c}", "p2p_infer.sim.loadgen", args)
            self.clients.append(f"client{c}")
        self._track(swarm)
        self._wait_clients(swarm)
        self.t0 = time.time()  # the load and the churn schedule start when every client is ready

    def _wait_clients(self, swarm: Swarm, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not all(any(e.get("kind") == "client_ready" for e in read_events(f)) for f in self.event_files):
            for c in self.clients:
                if not swarm.peers[c].alive():
                    raise SimulationError(f"{c} exited before it was ready:\n{swarm.peers[c].log_tail()}")
            if time.monotonic() > deadline:
                raise SimulationError(f"light clients not ready after {timeout} s")
            time.sleep(POLL_S)

    # ---- drive ----

    def _drive(self, swarm: Swarm) -> None:
        steps = list(self.churn.steps)
        deadline = time.time() + self.sc.duration_s
        while True:
            now = time.time() - self.t0
            while steps and steps[0][0] <= now:
                self._apply(swarm, *steps.pop(0))
            self._check_ready(swarm)
            done, answered, failed = self._progress()
            clients_alive = [c for c in self.clients if swarm.peers[c].alive()]
            if self.progress:
                self._show(swarm, now, done, failed)
            if not clients_alive and not steps:
                break
            if not clients_alive and done >= self.sc.load.queries:
                break
            if time.time() > deadline:
                log.warning("scenario duration reached: stopping", duration_s=self.sc.duration_s)
                break
            time.sleep(POLL_S)
        if self.progress and sys.stderr.isatty():
            sys.stderr.write("\n")

    def _show(self, swarm: Swarm, now: float, done: int, failed: int) -> None:
        """The progress line: redrawn in place on a terminal, one line every 5 s in a log."""
        tty = sys.stderr.isatty()
        if not tty and now - self.last_shown < 5.0:
            return
        self.last_shown = now
        up = sum(1 for p in swarm.serving() if p.alive())
        line = f"[{self.sc.name}] elapsed {now:6.1f}s  done {done}/{self.sc.load.queries}  failed {failed}  peers up {up}"
        sys.stderr.write(f"\r{line}  " if tty else line + "\n")
        sys.stderr.flush()

    def _apply(self, swarm: Swarm, at: float, action: str, name: str) -> None:
        t = time.time() - self.t0
        if action == "kill":
            peer_id = swarm.peers[name].peer_id
            swarm.kill(name, signal.SIGKILL)
            self.data.events.append(RunEvent(t, "kill", name, peer_id))
        elif action == "restart":
            swarm.restart(name, wait=False)
            self._track(swarm)
            self.pending_ready[name] = "ready"
            self.data.events.append(RunEvent(t, "restart", name))
        elif action in ("partition", "heal"):
            assert self.lab is not None
            group = self.sc.network.partition[int(name)].peers
            (self.lab.partition if action == "partition" else self.lab.heal)(group)
            self.data.events.append(RunEvent(t, action, ",".join(group)))
        elif action == "join":
            shard = f"{self.sc.model.name}:{self.sc.model.shards[len(swarm.peers) % len(self.sc.model.shards)]}"
            swarm.start_peer(name, [shard], wait=False)
            self._track(swarm)
            self.pending_ready[name] = "joined"
            self.data.events.append(RunEvent(t, "join", name))

    def _check_ready(self, swarm: Swarm) -> None:
        for name, kind in list(self.pending_ready.items()):
            peer = swarm.peers[name]
            if peer.ready_file.exists():
                peer.info = json.loads(peer.ready_file.read_text())
                self.data.roles.setdefault(peer.peer_id, "honest")
                self.data.events.append(RunEvent(time.time() - self.t0, kind, name, peer.peer_id))
                del self.pending_ready[name]
            elif not peer.alive():
                raise SimulationError(f"{name} exited with {peer.proc.returncode} while restarting:\n{peer.log_tail()}")

    def _progress(self) -> tuple[int, int, int]:
        done = answered = failed = 0
        for path in self.event_files:
            for event in read_events(path):
                if event.get("kind") == "query":
                    done += 1
                    answered += bool(event["ok"])
                    failed += not event["ok"]
        return done, answered, failed

    # ---- collect ----

    def _collect(self) -> None:
        for c, path in enumerate(self.event_files):
            by_i: dict[int, QueryOutcome] = {}
            for e in read_events(path):
                kind = e.get("kind")
                if kind == "query":
                    q = by_i[e["i"]] = QueryOutcome(
                        e["t0"] - self.t0, bool(e["ok"]), bool(e.get("wrong")), float(e.get("latency_ms", 0.0)),
                        int(e.get("hops", 0)), int(e.get("retries", 0)), list(e.get("route", [])), dict(e.get("verdicts", {})),
                        str(e.get("code", "")), f"client{c}", stages=list(e.get("stages", [])))
                    self.data.queries.append(q)
                elif kind == "judged" and e.get("i") in by_i:  # the final verdicts, members judged after the answer included
                    by_i[e["i"]].verdicts = dict(e["verdicts"])
                    by_i[e["i"]].judged_s = e["t_done"] - self.t0
                elif kind == "reputation":
                    self.data.reputation.append((e["t"] - self.t0, dict(e["scores"])))
                elif kind == "stuck":  # a query that outlived its timeout: where it waited (loadgen.watchdog)
                    self.data.extra.setdefault("stuck_queries", []).append({k: e[k] for k in ("i", "age_s", "tasks")})
                elif kind == "messages":  # what the client sent during the load, by type (loadgen.count_messages)
                    for key in ("requests", "published"):
                        total = self.data.extra.setdefault(f"client_{key}", {})
                        for k, v in e[key].items():
                            total[k] = total.get(k, 0) + v
                elif kind == "client_failed":
                    self.data.extra.setdefault("client_errors", []).append(e.get("error", ""))
        self.data.queries.sort(key=lambda q: q.t0_s)
        n = max(1, len(self.data.queries))
        for key in ("requests", "published"):
            if f"client_{key}" in self.data.extra:
                self.data.extra[f"client_{key}_per_query"] = {k: round(v / n, 2) for k, v in sorted(self.data.extra[f"client_{key}"].items())}
        self.data.extra["audit_log_entries_per_query"] = audit_log_entries(self.out / "swarm", n)


def audit_log_entries(swarm: Path, queries: int) -> dict[str, float]:
    """Entries per query in the peers' audit logs, by kind, averaged over the peers: what the
    consensus gossip delivered to each (a commit and a reveal per round, a verdict per stage)."""
    logs = sorted(swarm.glob("peer*.audit.log"))
    counts: dict[str, int] = {}
    for path in logs:
        for line in path.read_text().splitlines():
            try:
                kind = json.loads(line).get("kind", "?")
            except (json.JSONDecodeError, AttributeError):
                continue
            counts[kind] = counts.get(kind, 0) + 1
    return {k: round(v / max(1, len(logs)) / queries, 2) for k, v in sorted(counts.items())}


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return out


def processes_left(groups: set[int]) -> int:
    """Processes still alive in any process group this run started (read from /proc)."""
    left = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid = fields[0], int(fields[2])
        if pgid in groups and state not in ("Z", "X"):
            left += 1
    return left
