"""Simulation scenarios: TOML files in ``simulations/``, loaded into dataclasses.

Every table and key is declared here; an unknown key is refused by name (a typo such as
``kil = 0.2`` would otherwise run a scenario without churn and pass). Layout::

    name = "ci"; engine = "processes" | "des"; peers = 12; seed = 7
    [model]       name, shards (layer ranges "1-1"; peer i serves shards[i % len])
    [load]        queries, rate (per s), concurrency, clients, mode, committee, commit_timeout_s
    [churn]       kill (share of honest peers), start_s, every_s, down_s, joins, join_at_s
    [adversaries] share | count, kinds (testing/adversaries.py), collude, placement
    [network]     (des) latency model, bandwidth, compute, per-message cost;
                  (processes) mode = "netns": peers in network namespaces, [[network.shape]] per-peer
                  or per-link delay / jitter / loss / rate, [[network.partition]] cut and heal (sim/netns.py)
    [invariants]  max_wrong_accepted, min_success, max_processes_left
    [des]         DES-only knobs (kademlia k / alpha, candidates per stage)
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import ScenarioError

ENGINES = ("processes", "des")
PLACEMENTS = ("per-shard", "random")  # per-shard: `count` liars in each shard's providers


@dataclass
class ModelSpec:
    name: str = "digits-mlp"
    shards: list[str] = field(default_factory=lambda: ["1-3"])
    layers: int = 4  # des: layers of the modelled model (the client keeps layer 0)


@dataclass
class LoadSpec:
    queries: int = 100
    rate: float = 2.0  # arrivals per second, over all clients (Poisson)
    concurrency: int = 4  # queries in flight per client
    clients: int = 1
    mode: str = "committee"  # a key of sim.modes.MODES
    committee: int = 3
    optimistic: float = 0.5  # mode optimistic: the probability each stage is re-executed after the answer
    commit_timeout_s: float = 2.0
    max_reruns: int = 2
    request_timeout_s: float = 10.0
    warmup_s: float = 0.0


@dataclass
class ChurnSpec:
    kill: float = 0.0  # share of honest peers killed (SIGKILL) and restarted
    start_s: float = 10.0
    every_s: float = 10.0
    down_s: float = 10.0
    joins: int = 0  # new peers that join during the run
    join_at_s: float = 20.0
    rate_per_s: float = 0.0  # des: continuous churn, peers leaving per second (each rejoins after down_s)


@dataclass
class AdversarySpec:
    share: float = 0.0  # of all peers (random placement)
    count: int = 0  # per shard (per-shard placement)
    kinds: list[str] = field(default_factory=lambda: ["wrong-output"])
    collude: bool = False  # colluders commit to one agreed wrong output
    placement: str = "per-shard"
    trusted: bool = False  # the client is told to trust them (a deliberately broken run)


PROCESS_NAME = re.compile(r"^(bootstrap|(peer|joiner|client)\d+)$")


@dataclass
class ShapeSpec:
    """What ``peers`` send (egress of each; list both ends for a symmetric link) to ``to`` (every
    address when empty): delay and jitter (sch_netem), loss (iptables statistic), rate (htb)."""

    peers: list[str] = field(default_factory=list)
    to: list[str] = field(default_factory=list)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # share of packets dropped
    rate_mbit: float = 0.0  # 0: unlimited


@dataclass
class PartitionSpec:
    """``peers`` cut off from everyone else (they still reach each other) from start_s to heal_s."""

    peers: list[str] = field(default_factory=list)
    start_s: float = 10.0
    heal_s: float = 30.0


@dataclass
class NetworkSpec:
    latency: str = "coordinates"  # des: "coordinates" (2-D, ms) or "constant"
    base_latency_ms: float = 0.5  # one-way, loopback-like, plus the coordinate distance
    spread_ms: float = 40.0  # des: coordinate plane side, ms
    bandwidth_mbps: float = 1000.0
    compute_ms_per_layer: float = 2.0  # des: median per-layer compute time
    compute_spread: float = 0.3  # des: lognormal sigma across peers
    per_message_ms: float = 0.0  # des: fixed cost per message (framing, Noise, the event loop), calibrated
    dht_timeout_ms: float = 3000.0  # des: a DHT query to a dead peer fails after this (notes/libp2p.md)
    dial_timeout_ms: float = 1000.0  # des: a request to a dead peer fails after this
    cpu_scale: float = 1.0  # des: the real proto code's CPU time is charged as virtual time, times this
    mode: str = "loopback"  # processes: "loopback", or "netns" (own namespaces and addresses, sim/netns.py)
    shape: list[ShapeSpec] = field(default_factory=list)  # netns: slow or lossy peers and links
    partition: list[PartitionSpec] = field(default_factory=list)  # netns: groups cut off, then healed


@dataclass
class InvariantSpec:
    max_wrong_accepted: int = 0
    min_success: float = 0.99
    max_processes_left: int = 0


@dataclass
class DesSpec:
    kademlia_k: int = 20
    kademlia_alpha: int = 3
    candidates: int = 8  # providers a client asks for tickets per stage (from its DHT lookup)
    trial: bool = True  # trial tasks through proto.trial.Admission (des/trials.py); false: everyone admitted at once
    gossip: bool = True  # audit gossip through the real codec and Auditor (des/gossip.py)
    auditors: int = 8  # honest peers that run a real Auditor on every gossip message (the rest are counted)
    gossip_degree: int = 6  # gossipsub mesh degree D


@dataclass
class Scenario:
    name: str
    engine: str
    peers: int
    seed: int = 1
    duration_s: float = 600.0  # hard cap on the whole run
    note: str = ""  # what the run shows, copied into report.md
    record_ttl_s: float = 60.0  # processes: the peers' record TTL (15 s expired records on a loaded box)
    model: ModelSpec = field(default_factory=ModelSpec)
    load: LoadSpec = field(default_factory=LoadSpec)
    churn: ChurnSpec = field(default_factory=ChurnSpec)
    adversaries: AdversarySpec = field(default_factory=AdversarySpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    invariants: InvariantSpec = field(default_factory=InvariantSpec)
    des: DesSpec = field(default_factory=DesSpec)

    def validate(self) -> Scenario:
        from ..testing import TEST_FAULTS
        from .modes import MODES

        _check(self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}")
        _check(self.peers >= 1, "peers must be >= 1")
        _check(self.load.mode in MODES, f"load.mode {self.load.mode!r} is not built; known: {', '.join(MODES)}")
        _check(self.load.queries >= 1 and self.load.rate > 0 and self.load.concurrency >= 1 and self.load.clients >= 1,
               "load.queries, load.rate, load.concurrency and load.clients must be positive")
        _check(0 <= self.churn.kill <= 1 and 0 <= self.adversaries.share < 1, "churn.kill and adversaries.share are shares in [0, 1)")
        bad = [k for k in self.adversaries.kinds if k not in TEST_FAULTS]
        _check(not bad, f"adversaries.kinds: unknown {bad}; known: {', '.join(TEST_FAULTS)}")
        _check(self.adversaries.placement in PLACEMENTS, f"adversaries.placement must be one of {PLACEMENTS}")
        for shard in self.model.shards:
            parse_range(shard)
        self._validate_network()
        if self.engine == "processes" and self.adversaries.collude:
            raise ScenarioError("adversaries.collude needs engine = \"des\": the peers' --test-fault wrappers add independent noise, "
                                "and no colluding fault exists for real peers yet")
        return self


    def _validate_network(self) -> None:
        net = self.network
        _check(net.mode in ("loopback", "netns"), f"network.mode must be \"loopback\" or \"netns\", got {net.mode!r}")
        if net.mode == "loopback":
            _check(not net.shape and not net.partition, "network.shape / network.partition need network.mode = \"netns\"")
            return
        _check(self.engine == "processes", "network.mode = \"netns\" runs real processes: engine = \"processes\"")
        for spec in net.shape:
            _check(bool(spec.peers), "network.shape: peers is empty")
            _check(0 <= spec.loss < 1 and spec.delay_ms >= 0 and spec.jitter_ms >= 0 and spec.rate_mbit >= 0,
                   "network.shape: loss in [0, 1), delay_ms, jitter_ms, rate_mbit >= 0")
            _check(spec.jitter_ms <= spec.delay_ms, "network.shape: jitter_ms needs a delay_ms at least as large")
        for part in net.partition:
            _check(bool(part.peers) and 0 <= part.start_s < part.heal_s, "network.partition: peers, and 0 <= start_s < heal_s")
        names = [n for s in net.shape for n in s.peers + s.to] + [n for p in net.partition for n in p.peers]
        bad = sorted({n for n in names if not PROCESS_NAME.match(n)})
        _check(not bad, f"network: unknown process name(s) {bad}: bootstrap, peerN, joinerN or clientN")
        over = sorted({n for n in names if n.startswith("peer") and int(n[4:]) >= self.peers})
        _check(not over, f"network: {over} beyond peers = {self.peers}")


def parse_range(text: str) -> tuple[int, int]:
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        raise ScenarioError(f"shard {text!r} must be FIRST-LAST, e.g. \"1-3\"") from None
    _check(1 <= first <= last, f"shard {text!r}: need 1 <= first <= last (the client keeps layer 0)")
    return first, last


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise ScenarioError(reason)


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    """``cls`` from a TOML table: unknown keys and wrong types refused by name."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        kind = hints[name]
        if is_dataclass(kind):
            _check(isinstance(value, dict), f"{where}.{name} must be a table")
            values[name] = _build(kind, value, f"{where}.{name}" if where != "scenario" else name)
            continue
        values[name] = _coerce(value, kind, f"{where}.{name}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = getattr(kind, "__origin__", None)
    if origin is list and is_dataclass(kind.__args__[0]):  # an array of tables: [[network.shape]]
        _check(isinstance(value, list) and all(isinstance(v, dict) for v in value), f"{where} must be an array of tables")
        return [_build(kind.__args__[0], v, f"{where}[{j}]") for j, v in enumerate(value)]
    if origin is list:
        _check(isinstance(value, list) and all(isinstance(v, str) for v in value), f"{where} must be a list of strings")
        return value
    _check(isinstance(value, kind) and not (kind is int and isinstance(value, bool)),
           f"{where} must be {kind.__name__}, got {type(value).__name__}")
    return value


def load_scenario(path: Path) -> Scenario:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ScenarioError(f"no scenario file {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    for required in ("name", "engine", "peers"):
        _check(required in raw, f"{path}: missing top-level key {required!r}")
    return _build(Scenario, raw, "scenario").validate()
