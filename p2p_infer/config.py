"""Peer and client settings from, in increasing priority: defaults, a TOML file,
``P2P_INFER_*`` environment variables, and command-line flags (stated here, in :func:`layered`).

Each value is coerced to its field's type by pydantic (``"30"`` from the environment becomes
30.0); an unknown key is named with the closest known one. ``p2p-infer config show`` prints
the effective values and the layer each came from."""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

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
    serve: list[str] = field(default_factory=list)  # "MODEL:FIRST-LAST", or "MODEL": layers chosen by coverage
    memory_budget: str = ""  # weights a "MODEL"-only --serve may load ("512MB"); "" = a quarter of free memory
    max_batch: int = 32  # inputs per forward request this peer accepts (protocols/forward.md)
    log_format: str = "console"
    log_level: str = "info"
    record_ttl: float = 120.0  # seconds a capability record stays valid
    republish_interval: float = 0.0  # 0 = ttl / 3
    refresh_interval: float = 30.0  # routing-table refresh / re-join check
    max_concurrent: int = 0  # forward requests computed at once; 0 = one per CPU core (more only thrashes)
    torch_threads: int = 1
    ready_file: Path | None = None
    test_fault: str = ""  # testing aid, see docs/operator.md
    test_delay_ms: float = 0.0  # testing aid: every reply held this long (an emulated link)
    test_jitter_ms: float = 0.0  # testing aid: plus up to this much, uniform
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
    heartbeat_interval: float = 60.0  # seconds between a serving peer's heartbeat log lines; 0 = none

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


# The flags that set a setting of the same name (the CLI passes only those given).
SETTING_FLAGS = ("key", "listen", "bootstrap", "bootstrap_file", "serve", "log_format", "log_level",
                 "record_ttl", "max_concurrent", "torch_threads", "ready_file", "audit_log", "test_fault", "test_delay_ms", "test_jitter_ms",
                 "checkpoint_interval", "witness_file", "tee", "tee_quote", "threshold_member", "dkg_members",
                 "dkg_threshold", "max_connections", "conn_idle_timeout", "heartbeat_interval", "api", "api_public", "memory_budget", "max_batch")

Source = str  # "default", "file PATH", "env P2P_INFER_X", "flag --x"


@cache
def _adapter(name: str) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(get_type_hints(Settings)[name])


def _coerce(name: str, raw: Any, source: Source) -> Any:
    """One value as its field's type (pydantic's lax coercion); ConfigError names where it came from."""
    from pydantic import ValidationError

    if isinstance(raw, str) and source.startswith("env") and "list[" in str(get_type_hints(Settings)[name]):
        raw = [v for v in raw.split(",") if v]  # lists in env vars are comma-separated
    try:
        return _adapter(name).validate_python(raw)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].lower()
        raise ConfigError(f"{source}: {name.replace('_', '-')} = {raw!r}: {reason}") from None


def _check_names(table: dict[str, Any], where: str) -> dict[str, Any]:
    names = [f.name for f in fields(Settings)]
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise ConfigError(f"{where}: unknown setting {key!r}{hint}")
        out[name] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (create one with: p2p-infer config init {path})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return _check_names(table, f"config file {path}")


def layered(config_file: Path | None, overrides: dict[str, Any]) -> dict[str, tuple[Any, Source]]:
    """Every setting that is not its default, with the layer it came from: defaults < file < env < flags."""
    layers: dict[str, tuple[Any, Source]] = {}
    if config_file is not None:
        layers.update({k: (v, f"file {config_file}") for k, v in read_config_file(config_file).items()})
    for f in fields(Settings):
        env = os.environ.get(ENV_PREFIX + f.name.upper())
        if env is not None:
            layers[f.name] = (env, f"env {ENV_PREFIX}{f.name.upper()}")
    for name, value in _check_names(overrides, "flags").items():
        if value is not None and value != []:
            layers[name] = (value, f"flag --{name.replace('_', '-')}")
    # flags arrive typed and checked by click; file and env values are coerced here
    return {k: (v if src.startswith("flag") else _coerce(k, v, src), src) for k, (v, src) in layers.items()}


def load_settings(config_file: Path | None, overrides: dict[str, Any]) -> Settings:
    """Merge the layers; ``overrides`` holds only the flags the user actually gave."""
    return Settings(**{k: v for k, (v, _) in layered(config_file, overrides).items()})


def settings_sources(config_file: Path | None, overrides: dict[str, Any]) -> dict[str, Source]:
    """Where each setting's effective value comes from (``p2p-infer config show``)."""
    given = layered(config_file, overrides)
    return {f.name: given[f.name][1] if f.name in given else "default" for f in fields(Settings)}
