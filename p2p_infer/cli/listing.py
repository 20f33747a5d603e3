"""``p2p-infer peers`` and ``models``: what the network and this machine know."""

from __future__ import annotations

import argparse
import json
from typing import Any

import click

from ..config import Settings, default_cache_dir
from .app import cli, common, network, run
from .query import client_identity, need_bootstrap


@cli.command("peers")
@common
@network
@click.option("--json", "json_out", is_flag=True, help="one JSON object on stdout")
def peers_command(**values: Any) -> int:
    """List live peers and their verified capabilities."""
    values["json"] = values.pop("json_out")
    return run("peers", cmd_peers, values)


@cli.command("models")
@common
@click.option("--json", "json_out", is_flag=True, help="one JSON object on stdout")
def models_command(**values: Any) -> int:
    """List known models and their ids."""
    values["json"] = values.pop("json_out")
    return run("models", cmd_models, values)


def cmd_peers(args: argparse.Namespace, settings: Settings) -> int:
    import trio

    from ..node.client import Client
    from ..net.host import quiet_libp2p_logging
    from ..ml.models import known_manifests
    from ..verify.tee import policy_from_settings

    addrs = need_bootstrap(settings)
    quiet_libp2p_logging()
    names = {mid: m.name for mid, m in known_manifests(default_cache_dir()).items()}

    async def listing() -> list[dict[str, Any]]:
        async with Client(addrs, tee_policy=policy_from_settings(settings), identity=client_identity(settings, args),
                          listen=settings.listen, trial=False) as client:
            return peer_rows(client, names)

    peers = trio.run(listing)
    if args.json:
        print(json.dumps({"peers": peers}))
    else:
        print(f"{len(peers)} live peer(s)")
        for p in peers:
            shards = ", ".join(f"{s['model']}:{s['first']}-{s['last']}" for s in p["shards"]) or "(bootstrap / no layers)"
            print(f"  {p['peer_id']}  {shards}  throughput={p['throughput']:.0f} layers/s  load={p['load']:.2f}  tee={p['tee']}{' (verified)' if p['tee_verified'] else ''}")
    return 0


def peer_rows(client: Any, names: dict[str, str]) -> list[dict[str, Any]]:
    """What ``peers --json`` lists for each live record a joined client holds (also the test
    harness's in-process wait for records, so both read the overlay the same way)."""
    assert client.directory is not None
    return [
        {
            "peer_id": r.peer_id,
            "addrs": list(r.addrs),
            "shards": [{"model": names.get(s.model_id, s.model_id), "model_id": s.model_id, "first": s.first, "last": s.last} for s in r.shards],
            "throughput": r.throughput,
            "load": r.load,
            "tee": r.tee,
            "tee_verified": client.directory.attested(r.peer_id) is not None,
            "attestation": a.to_json() if (a := client.directory.attested(r.peer_id)) else None,
            "software": r.software,
            "protocols": list(r.protocols),
            "expires_in_s": round((r.expires_at_ms - _now_ms()) / 1000, 1),
            "rtt_ms": None if r.peer_id not in client.rtt_ms else round(client.rtt_ms[r.peer_id], 2),
        }
        for r in sorted(client.directory.live(), key=lambda r: r.peer_id)
    ]


def _now_ms() -> int:
    from ..clock import now_ms

    return now_ms()


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from ..ml.models import known_manifests

    manifests = known_manifests(default_cache_dir())
    rows = [{"name": m.name, "model_id": mid, "layers": m.num_layers, "hidden_size": m.hidden_size, "dtype": m.dtype, "runtime": m.runtime} for mid, m in manifests.items()]
    if args.json:
        print(json.dumps({"models": rows}))
    else:
        for r in rows:
            print(f"{r['name']:12} {r['model_id']}  layers={r['layers']} hidden={r['hidden_size']} {r['dtype']}")
    return 0
