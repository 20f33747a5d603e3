"""``p2p-infer query``: one query through the network, printed or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..config import Settings
from ..errors import UsageError
from ..proto.sortition import MIN_K
from . import params
from .app import cli, common, network, options, run
from .progress import Phases


def _committee_k(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < MIN_K:
        raise click.BadParameter(f"{value} is below the minimum committee size k={MIN_K} "
                                 "(k=1 is one key's word, k=2 has no majority to outvote a liar)", ctx, param)
    return value


committee_flags = options(
    click.option("--committee", type=int, metavar="K", callback=_committee_k,
                 help="run each stage on a VRF-chosen committee of K >= 3 peers (commit-reveal, quorum)"),
    click.option("--commit-timeout", type=click.FloatRange(0.0, min_open=True), default=5.0, show_default=True,
                 help="seconds members have to commit (committee mode)"),
    click.option("--save-cert", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE", help="write the quorum certificate here (committee mode)"),
    click.option("--save-output", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
                 help="write the certified output activation here, for verify --output (committee mode)"),
    click.option("--save-input", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
                 help="write the activation sent to the first committee here, for verify --input (committee mode)"),
)

tee_query = options(
    click.option("--require-tee", is_flag=True, help="route only through peers with a verified TEE attestation (docs/tee.md)"),
    click.option("--enhanced-privacy", is_flag=True,
                 help="encrypt the request to the attested peers' threshold key; the result comes back sealed to this client"),
)


@cli.command("query")
@common
@network
@click.option("--model", type=click.Choice(params.QUERY_MODELS), default="minilm-l6", show_default=True,
              help="minilm-l6 (text) or digits-mlp (64 pixel values, or test:N)")
@click.option("--local-layers", type=click.IntRange(1), default=1, show_default=True, help="layers the client runs itself (>= 1)")
@click.option("--forwarding", is_flag=True, help="peers pass activations along the route")
@click.option("--compare", is_flag=True, help="also run the model locally and print the difference")
@click.option("--json", "json_out", is_flag=True, help="one JSON object on stdout")
@committee_flags
@click.option("--mode", type=click.Choice(["general", "critical"]), default="general", show_default=True,
              help="critical: every shard returns a ZK proof and the client verifies the chain (provable models)")
@click.option("--save-proofs", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE", help="write the verified proof chain here (critical mode)")
@click.option("--proof-follows", is_flag=True, help="critical mode: print the result first, then verify the proofs")
@click.option("--spot-check", type=click.FloatRange(0.0, 1.0), default=0.0, metavar="P",
              help="re-run each stage on another provider with probability P in (0, 1]; the client's weights settle disagreements")
@click.option("--unverified", is_flag=True,
              help="no check: accept whatever the peers return (labelled UNVERIFIED); the default is a committee of 3 per stage")
@click.option("--optimistic", type=params.PROBABILITY, metavar="P",
              help="one executor per stage with a signed commitment; after the answer, re-execute each stage on another "
                   "provider with probability P in (0, 1] (a lie is accepted with probability 1-P; the check finishes before exit)")
@tee_query
@click.argument("input", nargs=-1, required=True)
def query_command(**values: Any) -> int:
    """Run a query through the network. INPUT is text for minilm-l6; for digits-mlp 64 comma-separated values or test:N.
    Several INPUTs are one batched query (one request per stage)."""
    values["json"] = values.pop("json_out")
    return run("query", cmd_query, values)


def check_query(args: argparse.Namespace) -> tuple[Any, Any]:
    """The plan and the parsed input, or UsageError: all before torch or the network."""
    n = params.model_layers()[args.model]
    if args.local_layers >= n:
        raise UsageError(f"--local-layers {args.local_layers}: {args.model} has {n} layers, so the client can run at most "
                         f"{n - 1} and leave one to the network")
    plan = query_plan(args)
    if args.save_proofs is not None and args.mode != "critical":
        raise UsageError("--save-proofs needs --mode critical (only critical mode returns proofs)")
    from ..proto.tensors import DEFAULT_MAX_BATCH

    inputs = [params.parse_query_input(args.model, text) for text in args.input]
    if len(inputs) > 1 and args.compare:
        raise UsageError("--compare takes one input, not a batch")
    if len(inputs) > 1 and args.mode == "critical":
        raise UsageError("--mode critical proves one input at a time: give one INPUT")
    if len(inputs) > DEFAULT_MAX_BATCH:
        raise UsageError(f"{len(inputs)} inputs: a batch takes at most {DEFAULT_MAX_BATCH} (peers refuse more)")
    return plan, inputs[0] if len(inputs) == 1 else inputs  # several: one batched query


def client_identity(settings: Settings, args: argparse.Namespace) -> Any:
    """A key given (flag, P2P_INFER_KEY or the config file) is used; otherwise a fresh key per run (a CLI client is not a peer)."""
    from ..config import settings_sources
    from ..identity import Identity, load_or_create_identity

    given = args.key is not None or settings_sources(args.config, {})["key"] != "default"
    return load_or_create_identity(settings.key) if given else Identity.generate()


def query_plan(args: argparse.Namespace) -> Any:
    """The flags as a QueryPlan, validated: an unsupported combination fails here, before any network."""
    from ..proto.plan import QueryPlan

    return QueryPlan.from_options(forwarding=args.forwarding, committee=args.committee, critical=args.mode == "critical",
                                  spot_check=args.spot_check, optimistic=args.optimistic, unverified=args.unverified,
                                  proof_follows=args.proof_follows, local_layers=args.local_layers, require_tee=args.require_tee,
                                  enhanced_privacy=args.enhanced_privacy).validate()


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    plan, inputs = check_query(args)  # UsageError / UnsupportedMode: main() prints its one line and exits 2
    identity = client_identity(settings, args)
    addrs = need_bootstrap(settings)
    import trio

    from ..net.host import quiet_libp2p_logging
    from ..node.client import Client
    from ..verify.tee import policy_from_settings

    quiet_libp2p_logging()

    async def query() -> dict[str, Any]:
        phases.phase("join and read the directory")
        async with Client(addrs, plan=plan, commit_timeout=args.commit_timeout, identity=identity, listen=settings.listen,
                          tee_policy=policy_from_settings(settings)) as client:
            phases.phase(f"query ({plan.describe()})")
            result = await client.run(args.model, inputs)
            phases.done()
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
            if result.judged is not None:  # committee: the members answering after a stage's quorum, judged (bounded)
                with trio.move_on_after(2 * args.commit_timeout + 5):
                    await result.judged
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

    with Phases("query", level="debug") as phases:  # a spinner on a terminal; debug lines otherwise
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
    """The verified chain, the layers it covers, the output it proves and the keys it was checked
    with (protocols/artifact.md)."""
    from ..verify import zk
    from ..verify.chain import ProofChainFile

    p = result.proofs
    pins = tuple({"vk_sha256": sh["vk_sha256"], "srs_sha256": sh["srs_sha256"]} for sh in p["shards"] if "srs_sha256" in sh)
    return ProofChainFile(result.model_id, p["first_layer"], p["last_layer"], p["input_hash"], tuple(p["output"]),
                          tuple(zk.ShardProof.from_wire(c) for c in p["chain"]), result.output,
                          pins if len(pins) == len(p["chain"]) else ()).encode()


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
    for i in range(out.get("batch", 1)):  # a batch: one line per input, in order
        print_output({k: v[i] for k, v in o.items()} if out.get("batch", 1) > 1 else o, f"[{i}] " if out.get("batch", 1) > 1 else "")
    print(f"route ({len(out['route'])} hops, client ran its first layers and the head locally in {out['local_ms']:.1f} ms):")
    for h in out["route"]:
        rt = f", round trip {h['round_trip_ms']:.1f} ms" if h["round_trip_ms"] else ""
        print(f"  layers {h['first']}-{h['last']} on {h['peer']}: compute {h['compute_ms']:.1f} ms{rt}")
    if out.get("proofs"):
        print_proofs(out["proofs"])
    for st in out.get("stages") or []:
        verdicts = ", ".join(f"{p[:12]}..={v}" for p, v in st["verdicts"].items())
        print(f"  stage {st['stage']} layers {st['first']}-{st['last']} (attempts {st['attempts']}): {verdicts}")
    if out["failed_peers"]:
        print(f"re-routed around {len(out['failed_peers'])} failed peer(s): {', '.join(out['failed_peers'])}")
    print(f"total {out['total_ms']:.1f} ms")
    if "local_check" in out:
        c = out["local_check"]
        print(f"check against the model run locally: max abs diff {c['max_abs_diff']:.2e} -> {'MATCH' if c['match'] else 'MISMATCH'}")


def print_output(o: dict[str, Any], prefix: str = "") -> None:
    if "embedding" in o:
        norm = sum(v * v for v in o["embedding"]) ** 0.5
        print(f"{prefix}embedding: {len(o['embedding'])} dims, norm {norm:.4f}, first values {[round(v, 4) for v in o['embedding'][:5]]}")
    else:
        print(f"{prefix}class {o['class']}, probabilities {[round(p, 3) for p in o['probabilities']]}")


def print_proofs(pr: dict[str, Any]) -> None:
    """The proof lines; with --proof-follows the first print comes before the proofs are in."""
    for sh in pr.get("shards") or []:
        print(f"  proof for layers {sh['first']}-{sh['last']}: VERIFIED ({sh['proof_bytes']} bytes, vk {sh['vk_sha256'][:16]}...)")
    if "verify_ms" in pr:
        print(f"  proof chain: client input -> ... -> output received: VERIFIED in {pr['verify_ms']:.1f} ms")
    else:
        print("  proof chain: not verified yet (proofs follow)")


def need_bootstrap(settings: Settings) -> list[str]:
    """The bootstrap addresses, or a usage error before the network: a client alone finds nothing."""
    addrs = list(settings.bootstrap) + (params.read_bootstrap_file(settings.bootstrap_file) if settings.bootstrap_file else [])
    if not addrs:
        where = f"{settings.bootstrap_file} lists none" if settings.bootstrap_file else "no bootstrap/peers.txt here"
        raise UsageError(f"no bootstrap peer configured ({where}): give --bootstrap MULTIADDR (a peer's full address, "
                         "as `p2p-infer bootstrap` prints it) or add a line to bootstrap/peers.txt")
    return addrs
