"""Peer and client settings from, in increasing priority: defaults, a TOML file,
``P2P_INFER_*`` environment variables, and command-line flags."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "P2P_INFER_"


def default_home() -> Path:
    return Path(os.environ.get("P2P_INFER_HOME", Path.home() / ".p2p-infer"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("P2P_INFER_CACHE", Path.home() / ".cache" / "p2p-infer"))


MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one peer (or client host) grants the rest of the network. Every remote peer is
    a stranger: the defaults keep a 2-core volunteer machine serving honest clients while
    others abuse it (docs/operator.md, "Resource limits"). Times in seconds."""

    max_connections: int = 256  # hard cap, refused at accept (py-libp2p's swarm enforces it)
    conn_idle_timeout: float = 120.0  # a connection with no stream for this long is closed
    stream_idle_timeout: float = 30.0  # a stream with no new request for this long is closed
    frame_timeout: float = 30.0  # a frame's payload must arrive within this, once announced
    max_streams_per_peer: int = 64  # concurrent inbound streams on p2p-infer protocols
    max_request_bytes_per_peer: int = 16 * MIB  # frames being read or served, per remote peer
    frame_memory_budget: int = 128 * MIB  # the same over all peers (py-libp2p's rcmgr memory)
    requests_per_second_per_peer: float = 500.0  # token bucket (rcmgr), burst of 2 s
    read_bytes_per_second_per_peer: int = 16 * MIB  # frames read from one peer, at most (token bucket, burst 1 s)
    max_queued_per_peer: int = 8  # compute requests waiting per remote peer
    max_queued: int = 64  # compute requests waiting in all


_LIMITS = Limits()


@dataclass
class Settings:
    key: Path = field(default_factory=lambda: default_home() / "peer.key")
    listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: list[str] = field(default_factory=list)
    bootstrap_file: Path | None = None
    serve: list[str] = field(default_factory=list)  # "MODEL:FIRST-LAST"
    log_format: str = "console"
    log_level: str = "info"
    record_ttl: float = 120.0  # seconds a capability record stays valid
    republish_interval: float = 0.0  # 0 = ttl / 3
    refresh_interval: float = 30.0  # routing-table refresh / re-join check
    max_concurrent: int = 0  # forward requests computed at once; 0 = one per CPU core (more only thrashes)
    torch_threads: int = 1
    ready_file: Path | None = None
    test_fault: str = ""  # testing aid, see docs/operator.md
    audit_log: Path | None = None  # default: the key file's name with .audit.log
    build_circuits: bool = True  # ZK circuits of served provable shards, built at start-up
    audit_max_bytes: int = 16 * MIB  # the live audit log rotates past this size
    audit_budget_bytes: int = 256 * MIB  # the oldest rotated audit files go past this total
    # resource limits (see Limits; names match)
    max_connections: int = _LIMITS.max_connections
    conn_idle_timeout: float = _LIMITS.conn_idle_timeout
    stream_idle_timeout: float = _LIMITS.stream_idle_timeout
    frame_timeout: float = _LIMITS.frame_timeout
    max_streams_per_peer: int = _LIMITS.max_streams_per_peer
    max_request_bytes_per_peer: int = _LIMITS.max_request_bytes_per_peer
    frame_memory_budget: int = _LIMITS.frame_memory_budget
    requests_per_second_per_peer: float = _LIMITS.requests_per_second_per_peer
    read_bytes_per_second_per_peer: int = _LIMITS.read_bytes_per_second_per_peer
    max_queued_per_peer: int = _LIMITS.max_queued_per_peer
    max_queued: int = _LIMITS.max_queued
    checkpoint_interval: float = 60.0  # seconds between signed checkpoints of the audit log (when it grew)
    witness_file: Path | None = None  # others' checkpoints this peer witnessed; default: the key file with .witnesses
    # TEE (docs/tee.md): the attestation backend this peer uses (none, sim, tdx, sgx) and, for
    # tdx/sgx without a quote device, a quote file; 
    tee: str = "none"
    tee_quote: Path | None = None
    threshold_member: bool = False  # join the threshold-key DKG (attested peers only)
    dkg_members: int = 3  # n: the ritual forms once this many attested members are listed
    dkg_threshold: int = 2  # t: shares needed to decrypt
    dkg_ritual: int = 1  # the ritual id (ferveo's tau)
    # what this node accepts as attested (readers: clients and DKG members)
    tee_allow_code: list[str] = field(default_factory=list)  # hex code hashes allowed besides our own
    tee_allow_platform: list[str] = field(default_factory=list)  # hex mr_td (tdx) / mr_enclave (sgx)
    tee_collateral: list[str] = field(default_factory=list)  # "tdx=FILE", "sgx=FILE": DCAP collateral JSON
    tee_max_age: float = 600.0  # seconds an attestation stays fresh
    api: str = ""  # HOST:PORT of the peer's control API (GET /status, /metrics); empty = off
    api_public: bool = False  # allow a non-loopback --api address (it has no authentication)

    def witness_path(self) -> Path:
        return self.witness_file or self.key.with_suffix(".witnesses")

    def republish_every(self) -> float:
        return self.republish_interval or self.record_ttl / 3

    def compute_slots(self) -> int:
        return self.max_concurrent if self.max_concurrent > 0 else max(1, os.cpu_count() or 1)

    def limits(self) -> Limits:
        values = {f.name: getattr(self, f.name) for f in fields(Limits)}
        for name, value in values.items():
            if not value > 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {value!r}")
        return Limits(**values)


def _coerce(name: str, raw: Any) -> Any:
    kind = {f.name: f for f in fields(Settings)}[name].type
    if isinstance(raw, str):
        if "bool" in str(kind):
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError(f"{name}: expected true or false, got {raw!r}")
            return raw.lower() in ("1", "true", "yes", "on")
        if "list" in str(kind):
            return [v for v in raw.split(",") if v]
        if "Path" in str(kind):
            return Path(raw)
        if "float" in str(kind):
            return float(raw)
        if "int" in str(kind):
            return int(raw)
        return raw
    if "Path" in str(kind) and raw is not None:
        return Path(raw)
    return raw


def load_settings(config_file: Path | None, overrides: dict[str, Any]) -> Settings:
    """Merge the layers; ``overrides`` holds only the flags the user actually gave."""
    names = {f.name for f in fields(Settings)}
    merged: dict[str, Any] = {}
    if config_file is not None:
        with open(config_file, "rb") as f:
            table = tomllib.load(f)
        unknown = sorted(set(k.replace("-", "_") for k in table) - names)
        if unknown:
            raise ConfigError(f"{config_file}: unknown setting(s) {unknown}")
        merged.update({k.replace("-", "_"): v for k, v in table.items()})
    for name in names:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            merged[name] = env
    merged.update({k: v for k, v in overrides.items() if v is not None and v != []})
    return Settings(**{k: _coerce(k, v) for k, v in merged.items()})
