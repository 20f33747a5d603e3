"""``p2p-infer gateway`` (an OpenAI-compatible HTTP API over the network) and ``p2p-infer
status`` (a peer's control API, summarised); also the peer's ``--api`` flags. The commands'
logic is plain functions; ``add_parsers`` only registers them (docs/gateway.md)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Settings

DEFAULT_GATEWAY = "127.0.0.1:8000"


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    peer = sub.choices.get("peer")
    if peer is not None:  # the control API of a serving peer
        peer.add_argument("--api", metavar="HOST:PORT", help="serve GET /status and /metrics here (loopback only, "
                          "unless --api-public)")
        peer.add_argument("--api-public", action="store_true", default=None,
                          help="allow a non-loopback --api address (the API has no authentication)")

    p = sub.add_parser("status", help="a running peer's status, read from its control API (peer --api)")
    common(p)
    p.add_argument("--api", dest="status_api", metavar="HOST:PORT", default=None,
                   help="the peer's control API (default 127.0.0.1:8470)")
    p.add_argument("--json", action="store_true", help="the raw /status object")
    p.add_argument("--timeout", type=float, default=5.0)

    p = sub.add_parser("gateway", help="serve an OpenAI-compatible HTTP API (embeddings, chat) through the network")
    common(p)
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="bootstrap peer (repeatable)")
    p.add_argument("--bootstrap-file", type=Path, help="file of bootstrap multiaddrs (default bootstrap/peers.txt if present)")
    p.add_argument("--listen", dest="http_listen", metavar="HOST:PORT", default=DEFAULT_GATEWAY,
                   help=f"HTTP address (default {DEFAULT_GATEWAY}; loopback only unless --public)")
    p.add_argument("--public", action="store_true", help="allow a non-loopback --listen address (no authentication)")
    p.add_argument("--p2p-listen", metavar="MULTIADDR", default="/ip4/127.0.0.1/tcp/0", help="the client's libp2p address")
    p.add_argument("--unverified", action="store_true",
                   help="answer every request unverified (labelled so in p2p_infer.verified); default: verified")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request to a peer")
    p.add_argument("--ready-file", type=Path, help="write {url, peer_id, pid} as JSON here once serving")


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from .gateway.http import parse_bind

    bind = parse_bind(args.http_listen, allow_public=args.public, flag="--listen", public_flag="--public")  # before joining
    import trio

    from .gateway.server import run_gateway
    from .net.host import quiet_libp2p_logging
    from .node.peer import bootstrap_addrs

    quiet_libp2p_logging()
    bootstrap = bootstrap_addrs(settings)
    options = {"listen": args.p2p_listen, "request_timeout": args.request_timeout}

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(lambda task_status: run_gateway(
                    bootstrap, bind, unverified=args.unverified, ready_file=args.ready_file, client_options=options,
                    task_status=task_status))
                print(url, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


def fetch_status(api: str, timeout: float) -> dict[str, Any]:
    import httpx

    from .errors import PeerUnreachable
    from .gateway.http import parse_bind

    bind = parse_bind(api, allow_public=True, flag="--api")
    try:
        reply = httpx.get(f"{bind.url}/status", timeout=timeout)
        reply.raise_for_status()
        return reply.json()  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError) as exc:
        raise PeerUnreachable(f"no control API at {bind}: {exc} (start the peer with --api {bind})") from None


def status_lines(s: dict[str, Any]) -> list[str]:
    serving = ", ".join(f"{x['model']}:{x['first']}-{x['last']}" for x in s["serving"]) or "(no layers: bootstrap)"
    req = s["requests"]
    lines = [f"peer {s['peer_id']}  (p2p-infer {s['version']}, up {s['uptime_s']:.0f} s)",
             f"  serving      {serving}  ({s['throughput']:.0f} layers/s measured)",
             f"  addresses    {', '.join(s['addrs'])}",
             f"  requests     {req['served']} served, {req['errors']} errors",
             f"  now          {s['connections']} connections, {s['sessions_open']} sessions open, queue {s['queue_depth']}, "
             f"load {s['load']:.2f}"]
    for proto, codes in sorted(req["by_protocol"].items()):
        lines.append(f"    {proto}: " + ", ".join(f"{code}={n}" for code, n in sorted(codes.items())))
    rep = s["reputation_seen"]
    if rep:
        low = sorted(rep.items(), key=lambda kv: kv[1])[:5]
        lines.append(f"  reputation   {len(rep)} peer(s) seen; lowest: " + ", ".join(f"{p[:12]}..={v:.3f}" for p, v in low))
    else:
        lines.append("  reputation   no peer seen yet")
    return lines


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from .node.control_api import DEFAULT_API

    s = fetch_status(args.status_api or settings.api or DEFAULT_API, args.timeout)
    if args.json:
        print(json.dumps(s))
    else:
        sys.stdout.write("\n".join(status_lines(s)) + "\n")
    return 0


COMMANDS = {"gateway": cmd_gateway, "status": cmd_status}
