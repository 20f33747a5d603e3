"""``p2p-infer config init|show``: write a commented settings file; print the effective settings."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from ..config import Settings, settings_sources
from ..errors import ConfigError
from .app import cli, common, make_args, network, settings_from

COMMENTS = {  # what a volunteer most often sets; every other setting is listed commented out
    "listen": "address to listen on (a public peer: /ip4/0.0.0.0/tcp/4001)",
    "bootstrap": "full multiaddrs of bootstrap peers (/ip4/.../tcp/PORT/p2p/PEER_ID)",
    "serve": 'layers this peer serves, "MODEL:FIRST-LAST" (p2p-infer models lists the models)',
    "key": "Ed25519 key file (created on first run, mode 0600)",
    "max_concurrent": "forward requests computed at once (0 = one per CPU core)",
    "record_ttl": "seconds a published capability record stays valid",
    "heartbeat_interval": "seconds between heartbeat log lines (0 = none)",
}


@cli.group("config")
def config_group() -> None:
    """Write a settings file, or show the effective settings and where each comes from."""


@config_group.command("init")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), default="p2p-infer.toml")
@click.option("--force", is_flag=True, help="overwrite an existing file")
def init_command(path: Path, force: bool) -> int:
    """Write a commented TOML settings file at PATH (default p2p-infer.toml)."""
    from ..files import write_atomically

    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    write_atomically(path, template().encode())
    click.echo(f"wrote {path}; use it with --config {path}")
    return 0


@config_group.command("show")
@common
@network
@click.option("--json", "json_out", is_flag=True, help="one JSON object on stdout")
def show_command(json_out: bool, **values: Any) -> int:
    """Print every setting's effective value and its source (default, file, env or flag)."""
    args = make_args("config show", values)
    settings = settings_from(args)  # the same checks a command runs
    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(Settings)} and v is not None}
    sources = settings_sources(args.config, flags)
    rows = {f.name: {"value": _plain(getattr(settings, f.name)), "source": sources[f.name]} for f in fields(Settings)}
    if json_out:
        click.echo(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("setting", "value", "source", box=None, pad_edge=False)
    for name, row in rows.items():
        table.add_row(name.replace("_", "-"), json.dumps(row["value"]), row["source"])
    Console(width=160).print(table)
    return 0


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def template() -> str:
    """Every setting with its default: the common ones explained and set, the rest commented out."""
    defaults = Settings()
    lines = ["# p2p-infer settings (docs/operator.md). Priority: defaults < this file < P2P_INFER_* env vars < flags.",
             "# Keys use dashes or underscores; an unknown key is an error. `p2p-infer config show --config FILE` checks it.", ""]
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        if value is None:
            lines.append(f"# {f.name.replace('_', '-')} = \"...\"  (unset)")
            continue
        if f.name in COMMENTS:
            lines += [f"# {COMMENTS[f.name]}", f"{f.name.replace('_', '-')} = {_toml(value)}", ""]
        else:
            lines.append(f"# {f.name.replace('_', '-')} = {_toml(value)}")
    return "\n".join(lines) + "\n"
