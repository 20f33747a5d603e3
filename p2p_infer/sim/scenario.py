"""Simulation scenarios: TOML files in ``simulations/``, loaded into dataclasses.

Every table and key is declared here; an unknown key is refused by name (a typo such as
``kil = 0.2`` would otherwise run a scenario without churn and pass). Layout::

    name = "ci"; engine = "processes" | "des"; peers = 12; seed = 7
    [model]       name, shards (layer ranges "1-1"; peer i serves shards[i % len])
    [load]        queries, rate (per s), concurrency, clients, mode, committee, commit_timeout_s
    [churn]       kill (share of honest peers), start_s, every_s, down_s, joins, join_at_s
    [adversaries] share | count, kinds (testing/adversaries.py), collude, placement
    [network]     (des) latency model, bandwidth, compute, per-message cost; netem: not built yet (refused)
    [invariants]  max_wrong_accepted, min_success, max_processes_left
    [des]         DES-only knobs (kademlia k / alpha, candidates per stage)
"""

from __future__ import annotations

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
    netem: bool = False  # processes: run peers in network namespaces with netem delays
    netem_delay_ms: float = 20.0
    netem_loss: float = 0.0
    partition_at_s: float = 0.0  # processes + netem: cut a peer's link at this time, heal after partition_s
    partition_s: float = 0.0


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
    trial: bool = True


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
        from ..testing.adversaries import TEST_FAULTS
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
        if self.network.netem or self.network.partition_s or self.network.partition_at_s:
            raise ScenarioError("network.netem / partition_*: network namespaces with netem are not built yet (issue 13's last step)")
        if self.engine == "processes" and self.adversaries.collude:
            raise ScenarioError("adversaries.collude needs engine = \"des\": the peers' --test-fault wrappers add independent noise, "
                                "and no colluding fault exists for real peers yet")
        return self


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
