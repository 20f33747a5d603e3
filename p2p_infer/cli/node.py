"""``p2p-infer id``, ``peer`` and ``bootstrap``: this node's key, and the long-running processes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import click
import structlog

from ..config import Settings
from . import params
from .app import cli, common, network, options, run
from ..cli_gateway import api_options
from ..testing import TEST_FAULTS

log = structlog.get_logger("p2p_infer.cli")

POSITIVE = click.FloatRange(0.0, min_open=True)
COUNT = click.IntRange(1)

serving = options(
    click.option("--record-ttl", type=POSITIVE, help="seconds a published capability record stays valid (default 120)"),
    click.option("--max-concurrent", type=COUNT, help="forward requests computed at once (default: one per CPU core)"),
    click.option("--torch-threads", type=COUNT, help="torch intra-op threads (default 1)"),
    click.option("--ready-file", type=click.Path(path_type=Path, dir_okay=False), help="write {peer_id, addrs, pid} as JSON here once serving"),
    click.option("--checkpoint-interval", type=POSITIVE, help="seconds between gossiped checkpoints of the audit log (default 60)"),
    click.option("--witness-file", type=click.Path(path_type=Path, dir_okay=False),
                 help="where witnessed checkpoints of other peers are kept (default: KEY with .witnesses)"),
    click.option("--heartbeat-interval", type=click.FloatRange(0.0), help="seconds between heartbeat log lines (default 60; 0 = none)"),
    click.option("--audit-log", type=click.Path(path_type=Path, dir_okay=False), help="append-only signed audit log (default: KEY with .audit.log)"),
    click.option("--max-connections", type=COUNT, help="connections at once, refused past it (default 256)"),
    click.option("--conn-idle-timeout", type=POSITIVE, help="seconds before a connection with no stream is closed (default 120)"),
)

tee_peer = options(
    click.option("--test-fault", type=click.Choice(TEST_FAULTS), help="TESTING AID, off by default: make this peer misbehave in committees"),
    click.option("--test-delay-ms", type=click.FloatRange(0.0), help="TESTING AID, off by default: hold every reply this long (an emulated link's round trip)"),
    click.option("--test-jitter-ms", type=click.FloatRange(0.0), help="TESTING AID, off by default: hold every reply up to this much longer (uniform)"),
    click.option("--tee", type=click.Choice(["none", "sim", "tdx", "sgx"]), help="attestation backend (default none; sim protects nothing: docs/tee.md)"),
    click.option("--tee-quote", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE", help="tdx/sgx: a DCAP quote file, where no quote device exists"),
    click.option("--threshold-member", is_flag=True, default=None, help="join the threshold-key DKG (needs --tee)"),
    click.option("--dkg-members", type=COUNT, metavar="N", help="members of the ritual (default 3)"),
    click.option("--dkg-threshold", type=COUNT, metavar="T", help="shares needed to decrypt (default 2)"),
)


@cli.command("id")
@common
def id_command(**values: Any) -> int:
    """Print this peer's id and public key (creating the key on first run)."""
    return run("id", cmd_id, values)


def cmd_id(args: argparse.Namespace, settings: Settings) -> int:
    from ..identity import load_or_create_identity

    identity = load_or_create_identity(settings.key)
    print(json.dumps({"peer_id": identity.peer_id, "public_key": identity.public_key.hex(), "key_file": str(settings.key)}))
    return 0


@cli.command("peer")
@common
@network
@click.option("--serve", multiple=True, type=params.SERVE,
              help="serve layers FIRST..LAST of MODEL; MODEL alone: the layers the network covers least (repeatable)")
@click.option("--memory-budget", type=params.MEMORY_SIZE, help="weights a --serve MODEL may load, e.g. 512MB (default: a quarter of free memory)")
@click.option("--max-batch", type=COUNT, help="inputs per forward request accepted (default 32)")
@serving
@tee_peer
@api_options  # --api, --api-public: the control API (cli_gateway.py)
def peer_command(**values: Any) -> int:
    """Run a peer that serves model layers."""
    return run("peer", cmd_peer, values)


@cli.command("bootstrap")
@common
@network
@serving
def bootstrap_command(**values: Any) -> int:
    """Run a bootstrap peer; prints its multiaddr."""
    return run("bootstrap", cmd_peer, values)


def cmd_peer(args: argparse.Namespace, settings: Settings) -> int:
    """Load the key first (a bad key file fails before torch), then run until signalled.
    A signal during start-up aborts it at once (exit 130): no load finished, nothing published."""
    from ..identity import load_or_create_identity
    from .progress import Phases

    identity = load_or_create_identity(settings.key)
    if args.command == "bootstrap":
        settings.serve = []
    warn_if_alone(args.command, settings)
    with Phases("peer") as phases:
        phases.phase("import torch and libp2p" if settings.serve else "import libp2p")
        import trio

        from ..logs import configure_logging
        from ..net.host import quiet_libp2p_logging
        from ..node.peer import Peer, run_peer_until_signalled

        quiet_libp2p_logging()
        peer = Peer(settings, identity)
        peer.on_phase = phases.phase
        configure_logging(settings.log_format, settings.log_level, peer=peer.identity.peer_id)  # type: ignore[arg-type]
        on_ready = (lambda addrs: (phases.done(), print(addrs[0], flush=True))) if args.command == "bootstrap" else (lambda _a: phases.done())
        completed = trio.run(run_peer_until_signalled, peer, on_ready)
    if not completed:
        raise KeyboardInterrupt  # a signal during start-up: the boundary says so and exits 130
    return 0


def warn_if_alone(command: str, settings: Settings) -> None:
    """A peer with no bootstrap peer serves nobody unless others dial it: say so loudly."""
    from .params import read_bootstrap_file

    if command != "peer" or settings.bootstrap or (settings.bootstrap_file and read_bootstrap_file(settings.bootstrap_file)):
        return
    where = f"{settings.bootstrap_file} lists none" if settings.bootstrap_file else "no bootstrap/peers.txt here"
    sys.stderr.write(f"warning: no bootstrap peer configured ({where}): this peer runs ALONE until another peer dials it; "
                     "give --bootstrap MULTIADDR or add a line to bootstrap/peers.txt\n")
    log.warning("no bootstrap peer configured", bootstrap_file=str(settings.bootstrap_file))
