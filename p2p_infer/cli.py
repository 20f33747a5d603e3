"""``p2p-infer``: run a peer or a bootstrap peer, list peers and models, query the network."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import cli_gateway, cli_generate
from .config import Settings, default_cache_dir, load_settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file of settings (flags and P2P_INFER_* env vars override it)")
    p.add_argument("--key", type=Path, help="Ed25519 key file (created on first run, mode 0600)")
    p.add_argument("--log-format", choices=["console", "json"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _network(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="bootstrap peer (repeatable)")
    p.add_argument("--bootstrap-file", type=Path, help="file of bootstrap multiaddrs (default bootstrap/peers.txt if present)")
    p.add_argument("--listen", metavar="MULTIADDR", help="listen address (default /ip4/127.0.0.1/tcp/0)")


def _committee_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--committee", type=int, metavar="K",
                   help="run each stage on a VRF-chosen committee of K >= 3 peers (commit-reveal, quorum)")
    p.add_argument("--commit-timeout", type=float, default=5.0, help="seconds members have to commit (committee mode)")
    p.add_argument("--save-cert", type=Path, metavar="FILE", help="write the quorum certificate here (committee mode)")
    p.add_argument("--save-output", type=Path, metavar="FILE",
                   help="write the certified output activation here, for verify --output (committee mode)")
    p.add_argument("--save-input", type=Path, metavar="FILE",
                   help="write the activation sent to the first committee here, for verify --input (committee mode)")


def _audit_and_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audit-log", type=Path, help="append-only signed audit log (default: KEY with .audit.log)")
    p.add_argument("--max-connections", type=int, help="connections at once, refused past it (default 256)")
    p.add_argument("--conn-idle-timeout", type=float, help="seconds before a connection with no stream is closed (default 120)")


def _tee_peer_flags(p: argparse.ArgumentParser) -> None:
    """The peer's attestation flags, and the testing aid (some of whose faults are bad attestations)."""
    p.add_argument("--test-fault", choices=["wrong-output", "no-reveal", "late-commit", "copy", "equivocate", "lie-after-trial",
                                             "claims-fast", "consistent-liar", "tee-forged", "tee-stale", "tee-measurement",
                                             "wrong-generation"],
                   help="TESTING AID, off by default: make this peer misbehave in committees")
    p.add_argument("--tee", choices=["none", "sim", "tdx", "sgx"],
           help="attestation backend (default none; sim protects nothing: docs/tee.md)")
    p.add_argument("--tee-quote", type=Path, metavar="FILE", help="tdx/sgx: a DCAP quote file, where no quote device exists")
    p.add_argument("--threshold-member", action="store_true", default=None, help="join the threshold-key DKG (needs --tee)")
    p.add_argument("--dkg-members", type=int, metavar="N", help="members of the ritual (default 3)")
    p.add_argument("--dkg-threshold", type=int, metavar="T", help="shares needed to decrypt (default 2)")


def _tee_query_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--require-tee", action="store_true", help="route only through peers with a verified TEE attestation (docs/tee.md)")
    p.add_argument("--enhanced-privacy", action="store_true",
                   help="encrypt the request to the attested peers' threshold key; the result comes back sealed to this client")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-infer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("id", help="print this peer's id and public key (creating the key on first run)")
    _common(p)

    for name, helptext in (("peer", "run a peer that serves model layers"), ("bootstrap", "run a bootstrap peer; prints its multiaddr")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        _network(p)
        if name == "peer":
            p.add_argument("--serve", action="append", metavar="MODEL:FIRST-LAST", help="serve layers FIRST..LAST of MODEL (repeatable)")
        p.add_argument("--record-ttl", type=float, help="seconds a published capability record stays valid (default 120)")
        p.add_argument("--max-concurrent", type=int, help="forward requests computed at once (default: one per CPU core)")
        p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default 1)")
        p.add_argument("--ready-file", type=Path, help="write {peer_id, addrs, pid} as JSON here once serving")
        p.add_argument("--checkpoint-interval", type=float, help="seconds between gossiped checkpoints of the audit log (default 60)")
        p.add_argument("--witness-file", type=Path, help="where witnessed checkpoints of other peers are kept (default: KEY with .witnesses)")
        _audit_and_limits(p)
        if name == "peer":
            _tee_peer_flags(p)

    p = sub.add_parser("peers", help="list live peers and their verified capabilities")
    _common(p)
    _network(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    p = sub.add_parser("models", help="list known models and their ids")
    _common(p)
    p.add_argument("--json", action="store_true")

    _query_parser(sub)

    p = sub.add_parser("verify", help="check a saved quorum certificate or proof chain offline (exit 0 only if valid)")
    _common(p)
    p.add_argument("certificate", type=Path, help="a --save-cert file, or a --save-proofs file with --proofs")
    p.add_argument("--proofs", action="store_true", help="the file is a proof chain (critical mode)")
    p.add_argument("--output", type=Path, metavar="FILE", help="check that this activation file (--save-output) is the certified output")
    p.add_argument("--input", type=Path, metavar="FILE", help="check that this activation file (--save-input) is the certified input")

    _more_parsers(sub)
    return parser


def _query_parser(sub: Any) -> None:
    p = sub.add_parser("query", help="run a query through the network")
    _common(p)
    _network(p)
    p.add_argument("--model", default="minilm-l6", help="minilm-l6 (text) or digits-mlp (64 pixel values, or test:N)")
    p.add_argument("--local-layers", type=int, default=1, help="layers the client runs itself (>= 1)")
    p.add_argument("--forwarding", action="store_true", help="peers pass activations along the route")
    p.add_argument("--compare", action="store_true", help="also run the model locally and print the difference")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _committee_flags(p)
    p.add_argument("--mode", choices=["general", "critical"], default="general",
                   help="critical: every shard returns a ZK proof and the client verifies the chain (provable models)")
    p.add_argument("--save-proofs", type=Path, metavar="FILE", help="write the verified proof chain here (critical mode)")
    p.add_argument("--proof-follows", action="store_true", help="critical mode: print the result first, then verify the proofs")
    p.add_argument("--spot-check", type=float, default=0.0, metavar="P",
                   help="re-run each stage on another provider with probability P in (0, 1]; the client's weights settle disagreements")
    p.add_argument("--unverified", action="store_true",
                   help="no check: accept whatever the peers return (labelled UNVERIFIED); the default is a committee of 3 per stage")
    p.add_argument("--optimistic", type=float, metavar="P",
                   help="one executor per stage with a signed commitment; after the answer, re-execute each stage on another "
                        "provider with probability P in (0, 1] (a lie is accepted with probability 1-P; the check finishes before exit)")
    _tee_query_flags(p)
    p.add_argument("input", help="text for minilm-l6; for digits-mlp 64 comma-separated values or test:N")


def _more_parsers(sub: Any) -> None:
    from .sim.cli import add_parser as simulate_parser  # p2p-infer simulate (p2p_infer/sim)

    _audit_parser(sub)
    simulate_parser(sub)
    cli_generate.add_parsers(sub, _common, _network)  # generate, chat
    cli_gateway.add_parsers(sub, _common)  # gateway, status; peer --api


def _audit_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="print an audit log and verify it against its peer's key and witnessed checkpoints")
    _common(p)
    p.add_argument("--log", type=Path, help="audit log file (default: the key file with .audit.log)")
    p.add_argument("--peer", metavar="PEER_ID", help="whose log it is: signatures are checked with the key this id embeds "
                   "(default: the --key file's peer), never with a key written in the log")
    p.add_argument("--witness", type=Path, action="append", metavar="FILE",
                   help="witnessed checkpoints (another peer's .witnesses file; repeatable; default: this node's own)")
    p.add_argument("--json", action="store_true")


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("key", "listen", "bootstrap", "bootstrap_file", "serve", "log_format", "log_level",
                 "record_ttl", "max_concurrent", "torch_threads", "ready_file", "audit_log", "test_fault",
                 "checkpoint_interval", "witness_file", "tee", "tee_quote", "threshold_member", "dkg_members", "dkg_threshold",
                 "max_connections", "conn_idle_timeout", "api", "api_public"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    settings = load_settings(getattr(args, "config", None), overrides)
    default_file = Path("bootstrap/peers.txt")
    if not settings.bootstrap and settings.bootstrap_file is None and default_file.exists():
        settings.bootstrap_file = default_file
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)  # type: ignore[arg-type]
    from .errors import P2PInferError, first_leaf

    try:
        return COMMANDS[args.command](args, settings)
    except P2PInferError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # trio nurseries wrap errors; ours still get one line
        ours, rest = group.split(P2PInferError)
        if ours is None or rest is not None:
            raise
        print(f"error: {first_leaf(ours).message}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_id(args: argparse.Namespace, settings: Settings) -> int:
    from .identity import load_or_create_identity

    identity = load_or_create_identity(settings.key)
    print(json.dumps({"peer_id": identity.peer_id, "public_key": identity.public_key.hex(), "key_file": str(settings.key)}))
    return 0


def cmd_peer(args: argparse.Namespace, settings: Settings) -> int:
    import trio

    from .net.host import quiet_libp2p_logging
    from .logs import configure_logging
    from .node.peer import Peer, run_peer_until_signalled

    if args.command == "bootstrap":
        settings.serve = []
    quiet_libp2p_logging()
    peer = Peer(settings)
    configure_logging(settings.log_format, settings.log_level, peer=peer.identity.peer_id)  # type: ignore[arg-type]
    on_ready = (lambda addrs: print(addrs[0], flush=True)) if args.command == "bootstrap" else None
    trio.run(run_peer_until_signalled, peer, on_ready)
    return 0


def cmd_peers(args: argparse.Namespace, settings: Settings) -> int:
    import trio

    from .node.client import Client
    from .net.host import quiet_libp2p_logging
    from .ml.models import known_manifests
    from .node.peer import bootstrap_addrs
    from .verify.tee import policy_from_settings

    quiet_libp2p_logging()
    names = {mid: m.name for mid, m in known_manifests(default_cache_dir()).items()}

    async def listing() -> list[dict[str, Any]]:
        async with Client(bootstrap_addrs(settings), tee_policy=policy_from_settings(settings)) as client:
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

    peers = trio.run(listing)
    if args.json:
        print(json.dumps({"peers": peers}))
    else:
        print(f"{len(peers)} live peer(s)")
        for p in peers:
            shards = ", ".join(f"{s['model']}:{s['first']}-{s['last']}" for s in p["shards"]) or "(bootstrap / no layers)"
            print(f"  {p['peer_id']}  {shards}  throughput={p['throughput']:.0f} layers/s  load={p['load']:.2f}  tee={p['tee']}{' (verified)' if p['tee_verified'] else ''}")
    return 0


def _now_ms() -> int:
    from .clock import now_ms

    return now_ms()


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from .ml.models import known_manifests

    manifests = known_manifests(default_cache_dir())
    rows = [{"name": m.name, "model_id": mid, "layers": m.num_layers, "hidden_size": m.hidden_size, "dtype": m.dtype, "runtime": m.runtime} for mid, m in manifests.items()]
    if args.json:
        print(json.dumps({"models": rows}))
    else:
        for r in rows:
            print(f"{r['name']:12} {r['model_id']}  layers={r['layers']} hidden={r['hidden_size']} {r['dtype']}")
    return 0


def parse_query_input(model: str, text: str) -> Any:
    if model != "digits-mlp":
        return text
    if text.startswith("test:"):
        from .ml.models import DigitsMLP

        _, _, x_test, _ = DigitsMLP.dataset()
        return x_test[int(text[5:])].tolist()
    return [float(v) for v in text.split(",")]


def query_plan(args: argparse.Namespace) -> Any:
    """The flags as a QueryPlan, validated: an unsupported combination fails here, before any network."""
    from .proto.plan import QueryPlan

    return QueryPlan.from_options(forwarding=args.forwarding, committee=args.committee, critical=args.mode == "critical",
                                  spot_check=args.spot_check, optimistic=args.optimistic, unverified=args.unverified,
                                  proof_follows=args.proof_follows, local_layers=args.local_layers, require_tee=args.require_tee,
                                  enhanced_privacy=args.enhanced_privacy).validate()


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    plan = query_plan(args)  # UnsupportedMode: main() prints its one line and exits 1
    import trio

    from .node.client import Client
    from .net.host import quiet_libp2p_logging
    from .node.peer import bootstrap_addrs
    from .verify.tee import policy_from_settings

    quiet_libp2p_logging()
    inputs = parse_query_input(args.model, args.input)

    async def query() -> dict[str, Any]:
        async with Client(bootstrap_addrs(settings), plan=plan, commit_timeout=args.commit_timeout,
                          tee_policy=policy_from_settings(settings)) as client:
            result = await client.run(args.model, inputs)
            if args.proof_follows and result.proofs is not None:
                if not args.json:
                    print_result(result.to_json())
                    print("proofs follow: collecting and verifying...", flush=True)
                started = time.perf_counter()
                await client.verify_followed(result)
                result.proofs["followed_after_ms"] = (time.perf_counter() - started) * 1000
            if result.check is not None:  # optimistic: the answer is in, its check runs; wait for it before exiting
                if not args.json:
                    print_result(result.to_json())
                    print("optimistic check: running after the answer...", flush=True)
                await result.check
            out = result.to_json()
            out["tee"] = tee_report(client, out, plan.require_tee)
            if args.save_proofs is not None and result.proofs is not None:
                args.save_proofs.write_bytes(proof_file(result))
                out["proofs_file"] = str(args.save_proofs)
            if args.save_cert is not None and result.certificate is not None:
                args.save_cert.write_bytes(result.certificate)
                out["certificate_file"] = str(args.save_cert)
            out.update(save_certified(args, getattr(client, "last_certified", None) if result.certificate else None))
            if args.compare:
                model = await client.model(args.model)
                out["local_check"] = compare_outputs(result.output, model.run_local(inputs))
            return out

    out = trio.run(query)
    if args.json:
        print(json.dumps(out))
    elif out.get("check") is not None:
        print_check(out)
    else:
        print_result(out)
    if (out.get("check") or {}).get("mismatch"):  # the answer already printed did not hold up
        print("error: optimistic check: an answer returned did not match its re-executions (see above)", file=sys.stderr)
        return 1
    return 0


def tee_report(client: Any, out: dict[str, Any], required: bool) -> dict[str, Any]:
    """Which route peers had a verified attestation, as the client's directory checked it."""
    peers = sorted({p for h in out.get("route", []) for p in h["peer"].split(",") if p}
                   | {m for s in out.get("stages", []) for m in s.get("verdicts", {})})  # committee members too
    attested = {p: a.to_json() for p in peers if (a := client.directory.attested(p)) is not None}
    return {"required": required, "attested": attested, "route_peers": len(peers), "all_attested": len(attested) == len(peers)}


def verification_line(out: dict[str, Any]) -> str:
    """How the answer was checked, in one line that cannot be missed."""
    labels = sorted({s["check"] for s in out.get("verification") or []})
    stages = len(out.get("verification") or [])
    if out.get("verified"):
        return f"VERIFIED: {', '.join(labels)} on every stage ({stages})"
    if labels == ["none"]:
        return "UNVERIFIED: no stage was checked (--unverified); a dishonest peer's answer would be accepted"
    if labels and labels[0].startswith("optimistic"):
        return f"OPTIMISTIC ({labels[0]}): returned before its check; a lie is accepted with probability 1-p per stage"
    checked = sum(1 for s in out.get("verification") or [] if s["verified"])
    return f"UNVERIFIED: {checked} of {stages} stage(s) checked ({', '.join(labels)})"


def print_check(out: dict[str, Any]) -> None:
    """The optimistic check's outcome, per stage (the result itself was printed before it ran)."""
    check = out["check"]
    for st in check.get("stages", []):
        what = f"re-executed by {', '.join(c[:16] + '...' for c in st['checkers'])}" if st["checkers"] else "no re-execution"
        wrong = f", evidence against {st['wrong']}" if st["wrong"] else ""
        print(f"  check layers {st['first']}-{st['last']}: {'drawn' if st['checked'] else 'not drawn'}, {what}: {st['outcome']}{wrong}")
    verdict = "MISMATCH: an answer already returned did not hold" if check.get("mismatch") else "no mismatch found"
    print(f"optimistic check {'ran' if check.get('ran') else 'did not run (not drawn)'}: {verdict}")
    if "local_check" in out:
        c = out["local_check"]
        print(f"check against the model run locally: max abs diff {c['max_abs_diff']:.2e} -> {'MATCH' if c['match'] else 'MISMATCH'}")


def save_certified(args: argparse.Namespace, certified: dict[str, bytes] | None) -> dict[str, str]:
    """Write the certified input and output activations where the flags ask (committee mode)."""
    written = {}
    for flag, part in (("save_input", "input"), ("save_output", "output")):
        path = getattr(args, flag)
        if path is not None and certified is not None:
            path.write_bytes(certified[part])
            written[f"{part}_file"] = str(path)
    return written


def proof_file(result: Any) -> bytes:
    """The verified chain, the layers it covers and the output it proves (protocols/artifact.md)."""
    from .verify import zk
    from .verify.chain import ProofChainFile

    p = result.proofs
    return ProofChainFile(result.model_id, p["first_layer"], p["last_layer"], p["input_hash"], tuple(p["output"]),
                          tuple(zk.ShardProof.from_wire(c) for c in p["chain"]), result.output).encode()


def compare_outputs(remote: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    if "embedding" in remote:
        diff = max(abs(a - b) for a, b in zip(remote["embedding"], local["embedding"]))
        return {"max_abs_diff": diff, "match": diff <= 1e-5}
    diff = max(abs(a - b) for a, b in zip(remote["probabilities"], local["probabilities"]))
    return {"max_abs_diff": diff, "match": remote["class"] == local["class"]}


def print_result(out: dict[str, Any]) -> None:
    o = out["output"]
    print(f"model {out['model']} ({out['model_id'][:16]}...), mode {out['mode']}")
    print(verification_line(out))
    if "embedding" in o:
        norm = sum(v * v for v in o["embedding"]) ** 0.5
        print(f"embedding: {len(o['embedding'])} dims, norm {norm:.4f}, first values {[round(v, 4) for v in o['embedding'][:5]]}")
    else:
        print(f"class {o['class']}, probabilities {[round(p, 3) for p in o['probabilities']]}")
    print(f"route ({len(out['route'])} hops, client ran its first layers and the head locally in {out['local_ms']:.1f} ms):")
    for h in out["route"]:
        rt = f", round trip {h['round_trip_ms']:.1f} ms" if h["round_trip_ms"] else ""
        print(f"  layers {h['first']}-{h['last']} on {h['peer']}: compute {h['compute_ms']:.1f} ms{rt}")
    if out.get("proofs"):
        pr = out["proofs"]
        for sh in pr["shards"]:
            print(f"  proof for layers {sh['first']}-{sh['last']}: VERIFIED ({sh['proof_bytes']} bytes, vk {sh['vk_sha256'][:16]}...)")
        print(f"  proof chain: client input -> ... -> output received: VERIFIED in {pr['verify_ms']:.1f} ms")
    for st in out.get("stages") or []:
        verdicts = ", ".join(f"{p[:12]}..={v}" for p, v in st["verdicts"].items())
        print(f"  stage {st['stage']} layers {st['first']}-{st['last']} (attempts {st['attempts']}): {verdicts}")
    if out["failed_peers"]:
        print(f"re-routed around {len(out['failed_peers'])} failed peer(s): {', '.join(out['failed_peers'])}")
    print(f"total {out['total_ms']:.1f} ms")
    if "local_check" in out:
        c = out["local_check"]
        print(f"check against the model run locally: max abs diff {c['max_abs_diff']:.2e} -> {'MATCH' if c['match'] else 'MISMATCH'}")


def cmd_verify_proofs(path: Path) -> int:
    """Check a saved proof chain with only settings, verifying keys and SRS (built or cached
    locally from this machine's copy of the model, never taken from the file), the layer
    count of this machine's manifest, and the output the file claims."""
    from .ml.models import known_manifests, load_model
    from .verify import zk
    from .verify.chain import ProofChainFile, verify_saved

    try:
        saved = ProofChainFile.decode(path.read_bytes())
        manifest = known_manifests(default_cache_dir()).get(saved.model_id)
        if manifest is None:
            raise zk.ZkError(f"proofs are for unknown model {saved.model_id[:16]}...")
        model = load_model(manifest.name, default_cache_dir())
        lines = verify_saved(saved, model, manifest.num_layers, default_cache_dir())
    except (zk.ZkError, OSError, KeyError, TypeError, ValueError) as exc:
        print(f"INVALID: {getattr(exc, 'message', exc)}")
        return 1
    print(f"VALID proof chain for {manifest.name}: " + ", ".join(f"layers {p.first}-{p.last}" for p in saved.proofs))
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    if args.proofs:
        return cmd_verify_proofs(args.certificate)
    from .identity import peer_id_from_public_key
    from .ml.models import known_manifests
    from .proto.consensus import Certificate, ConsensusError, read_activation_file

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
    from .proto.audit import verify_log
    from .proto.checkpoints import check_log_against
    from .errors import AuditError

    path = args.log or settings.audit_log or settings.key.with_suffix(".audit.log")
    try:
        entries = verify_log(path)
        peer = audit_peer(args, settings)
        anchoring = None if peer is None else check_log_against(entries, peer, witnessed(args, settings, peer))
    except (AuditError, OSError) as exc:
        print(f"INVALID audit log {path}: {getattr(exc, 'message', exc)}")
        return 1
    summary = audit_summary(path, len(entries), peer, anchoring)
    if args.json:
        print(json.dumps({"log": str(path), "entries": entries, "peer": peer, "summary": summary,
                          "anchored_at": None if anchoring is None else anchoring.anchored_at,
                          "checkpoints": 0 if anchoring is None else len(anchoring.checked)}))
    else:
        for e in entries:
            print(f"{e['seq']:5d} {e['kind']:10s} {json.dumps(e['data'], sort_keys=True)}")
        print(summary)
    return 0


def audit_peer(args: argparse.Namespace, settings: Settings) -> str | None:
    """Whose log: --peer, else the peer of an explicit --key, else (default log) this node's own key."""
    from .identity import load_identity

    if args.peer:
        return str(args.peer)
    if args.key is not None or (args.log is None and settings.key.exists()):
        return load_identity(settings.key).peer_id
    return None


def witnessed(args: argparse.Namespace, settings: Settings, peer: str) -> list[Any]:
    """Every checkpoint of ``peer`` in the --witness files, or in this node's own witness store."""
    from .node.anchors import load_witness_file

    files = args.witness or ([settings.witness_path()] if settings.witness_path().exists() else [])
    return [c for f in files for c in load_witness_file(f).of(peer)]


def audit_summary(path: Path, n: int, peer: str | None, anchoring: Any) -> str:
    if peer is None:
        return (f"{n} entries, hash chain and signatures verified ({path}); NOT ANCHORED: the signer was taken "
                "from the log itself, so a re-signed, truncated or emptied log passes too (give --peer or --key)")
    line = f"{n} entries, hash chain and signatures verified against {peer}'s own key ({path})"
    if not anchoring.checked:
        return line + "; NOT ANCHORED: no witnessed checkpoint of this peer, so a cut tail cannot be detected (give --witness)"
    tail = anchoring.entries - anchoring.anchored_at
    return (line + f"; consistent with {len(anchoring.checked)} witnessed checkpoint(s), anchored through entry "
            f"{anchoring.anchored_at - 1} ({tail} later entr{'y' if tail == 1 else 'ies'} not yet anchored)"
            + "".join(f"; {note}" for note in anchoring.notes))


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from .sim.cli import cmd_simulate as run

    return run(args, settings)


COMMANDS = {
    "simulate": cmd_simulate,
    "verify": cmd_verify,
    "audit": cmd_audit,
    "id": cmd_id,
    "peer": cmd_peer,
    "bootstrap": cmd_peer,
    "peers": cmd_peers,
    "models": cmd_models,
    "query": cmd_query,
    **cli_generate.COMMANDS,
    **cli_gateway.COMMANDS,
}

if __name__ == "__main__":
    sys.exit(main())
