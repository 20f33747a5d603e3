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
    max_concurrent: int = 4  # forward requests computed at once
    torch_threads: int = 1
    ready_file: Path | None = None
    test_fault: str = ""  # testing aid, see docs/operator.md
    audit_log: Path | None = None  # default: the key file's name with .audit.log
    checkpoint_interval: float = 60.0  # seconds between signed checkpoints of the audit log (when it grew)
    witness_file: Path | None = None  # others' checkpoints this peer witnessed; default: the key file with .witnesses

    def witness_path(self) -> Path:
        return self.witness_file or self.key.with_suffix(".witnesses")

    def republish_every(self) -> float:
        return self.republish_interval or self.record_ttl / 3


def _coerce(name: str, raw: Any) -> Any:
    kind = {f.name: f for f in fields(Settings)}[name].type
    if isinstance(raw, str):
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
