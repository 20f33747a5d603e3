"""``p2p-infer verify`` and ``audit``: offline checks of saved certificates, proofs and logs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import click

from ..config import Settings, default_cache_dir
from .app import cli, common, run

EXISTING = click.Path(path_type=Path, dir_okay=False, exists=True)


@cli.command("verify")
@common
@click.argument("certificate", type=EXISTING)
@click.option("--proofs", is_flag=True, help="the file is a proof chain (critical mode)")
@click.option("--output", type=EXISTING, metavar="FILE", help="check that this activation file (--save-output) is the certified output")
@click.option("--input", "input_", type=EXISTING, metavar="FILE", help="check that this activation file (--save-input) is the certified input")
def verify_command(**values: Any) -> int:
    """Check a saved quorum certificate (a --save-cert file) or proof chain (--save-proofs, with --proofs) offline; exit 0 only if valid."""
    values["input"] = values.pop("input_")
    return run("verify", cmd_verify, values)


@cli.command("audit")
@common
@click.option("--log", type=EXISTING, help="audit log file (default: the key file with .audit.log)")
@click.option("--peer", metavar="PEER_ID", help="whose log it is: signatures are checked with the key this id embeds "
              "(default: the --key file's peer), never with a key written in the log")
@click.option("--witness", type=EXISTING, multiple=True, metavar="FILE",
              help="witnessed checkpoints (another peer's .witnesses file; repeatable; default: this node's own)")
@click.option("--json", "json_out", is_flag=True, help="one JSON object on stdout")
def audit_command(**values: Any) -> int:
    """Print an audit log and verify it against its peer's key and witnessed checkpoints."""
    values["json"] = values.pop("json_out")
    return run("audit", cmd_audit, values)


def cmd_verify_proofs(path: Path) -> int:
    """Check a saved proof chain with only settings, verifying keys and SRS (built or cached
    locally from this machine's copy of the model, never taken from the file), the layer
    count of this machine's manifest, and the output the file claims."""
    from ..ml.models import known_manifests, load_model
    from ..verify import zk
    from ..verify.chain import ProofChainFile, verify_saved

    try:
        saved = ProofChainFile.decode(path.read_bytes())
        manifest = known_manifests(default_cache_dir()).get(saved.model_id)
        if manifest is None:
            raise zk.ZkError(f"proofs are for unknown model {saved.model_id[:16]}...")
        model = load_model(manifest.name, default_cache_dir())
        other = other_keys(saved, model)
        if other:
            print(f"CANNOT VERIFY here: {other}")
            return 1
        lines = verify_saved(saved, model, manifest.num_layers, default_cache_dir())
    except (zk.ZkError, OSError, KeyError, TypeError, ValueError) as exc:
        print(f"INVALID: {getattr(exc, 'message', exc)}")
        return 1
    print(f"VALID proof chain for {manifest.name}: " + ", ".join(f"layers {p.first}-{p.last}" for p in saved.proofs))
    for line in lines:
        print(f"  {line}")
    return 0


def other_keys(saved: Any, model: Any) -> str | None:
    """Why this machine cannot judge the file's proofs, if its SRS or verifying keys are not the
    ones they were made with (another cache's test SRS): a valid proof is not INVALID here."""
    from ..verify import zk
    from ..verify.chain import local_kits

    if not saved.pins:
        return None
    kits = local_kits(model, [(p.first, p.last) for p in saved.proofs], default_cache_dir())
    for proof, pin in zip(saved.proofs, saved.pins):
        kit = kits[(proof.first, proof.last)]
        srs = zk.sha256_file(kit.srs)
        if srs != pin["srs_sha256"]:
            return (f"the proof of layers {proof.first}-{proof.last} was made with SRS {pin['srs_sha256'][:16]}..., this "
                    f"machine's is {srs[:16]}... (a different SRS: a test SRS is generated per cache; share one with "
                    "P2P_INFER_SRS_DIR, see docs/zk.md); a proof can only be checked against its own SRS")
        vk = zk.sha256_file(kit.vk)
        if vk != pin["vk_sha256"]:
            return (f"the proof of layers {proof.first}-{proof.last} was made with verifying key {pin['vk_sha256'][:16]}..., "
                    f"this machine builds {vk[:16]}... from its own weights and SRS (different weights or circuit settings)")
    return None


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    if args.proofs:
        return cmd_verify_proofs(args.certificate)
    from ..identity import peer_id_from_public_key
    from ..ml.models import known_manifests
    from ..proto.consensus import Certificate, ConsensusError, read_activation_file

    try:
        cert = Certificate.decode(args.certificate.read_bytes())
        layers = {mid: m.num_layers for mid, m in known_manifests(default_cache_dir()).items()}
        if cert.model_id not in layers:
            raise ConsensusError(f"certificate is for unknown model {cert.model_id[:16]}...")
        lines = cert.verify(known_layers=lambda mid: layers[mid])
        if args.input is not None:
            cert.check_input(*read_activation_file(args.input.read_bytes()))
            lines.append(f"input {args.input}: is the activation the client sent the first committee")
        if args.output is not None:
            cert.check_output(*read_activation_file(args.output.read_bytes()))
            lines.append(f"output {args.output}: is the certified output")
    except (ConsensusError, OSError) as exc:
        print(f"INVALID: {getattr(exc, 'message', exc)}")
        return 1
    print(f"VALID certificate for model {cert.model_id[:16]}..., request {cert.request_hash.hex()[:16]}..., "
          f"client {peer_id_from_public_key(cert.client_key)}")
    for line in lines:
        print(f"  {line}")
    print(f"  output hash {cert.output_hash.hex()}")
    if args.output is None:
        print("  (no --output given: this says a quorum agreed on some output, not on the one you hold)")
    return 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """Verify a log's chain, then (given whose it is) its signatures against the peer's own key
    and every checkpoint of that peer that witnesses saw (docs/operator.md, "Audit log")."""
    from ..proto.audit import verify_log
    from ..proto.checkpoints import check_log_against
    from ..errors import AuditError

    path = args.log or settings.audit_log or settings.key.with_suffix(".audit.log")
    try:
        peer = audit_peer(args, settings)  # refused (exit 2) if nobody says whose log it is
        entries = verify_log(path)
        anchoring = check_log_against(entries, peer, witnessed(args, settings, peer))
    except (AuditError, OSError) as exc:
        print(f"INVALID audit log {path}: {getattr(exc, 'message', exc)}")
        return 1
    summary = audit_summary(path, len(entries), peer, anchoring)
    if args.json:
        print(json.dumps({"log": str(path), "entries": entries, "peer": peer, "summary": summary,
                          "anchored_at": anchoring.anchored_at, "checkpoints": len(anchoring.checked)}))
    else:
        for e in entries:
            print(f"{e['seq']:5d} {e['kind']:10s} {json.dumps(e['data'], sort_keys=True)}")
        print(summary)
    return 0


def audit_peer(args: argparse.Namespace, settings: Settings) -> str:
    """Whose log: --peer, else the peer of an explicit --key, else (default log) this node's own
    key. Never the signer written in the log: a re-signed or replaced log would pass (issue 9)."""
    from ..errors import UsageError
    from ..identity import load_identity

    if args.peer:
        return str(args.peer)
    if args.key is not None or (args.log is None and settings.key.exists()):
        return load_identity(settings.key).peer_id
    raise UsageError("whose log is it? give --peer PEER_ID or --key FILE: a log is checked against the peer's "
                     "own key, never the key written in it (a re-signed or replaced log would pass)")


def witnessed(args: argparse.Namespace, settings: Settings, peer: str) -> list[Any]:
    """Every checkpoint of ``peer`` in the --witness files, or in this node's own witness store."""
    from ..node.anchors import load_witness_file

    files = args.witness or ([settings.witness_path()] if settings.witness_path().exists() else [])
    return [c for f in files for c in load_witness_file(f).of(peer)]


def audit_summary(path: Path, n: int, peer: str, anchoring: Any) -> str:
    line = f"{n} entries, hash chain and signatures verified against {peer}'s own key ({path})"
    if not anchoring.checked:
        return line + "; NOT ANCHORED: no witnessed checkpoint of this peer, so a cut tail cannot be detected (give --witness)"
    tail = anchoring.entries - anchoring.anchored_at
    return (line + f"; consistent with {len(anchoring.checked)} witnessed checkpoint(s), anchored through entry "
            f"{anchoring.anchored_at - 1} ({tail} later entr{'y' if tail == 1 else 'ies'} not yet anchored)"
            + "".join(f"; {note}" for note in anchoring.notes))
