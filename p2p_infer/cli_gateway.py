"""``p2p-infer gateway`` (an OpenAI-compatible HTTP API over the network) and ``p2p-infer
status`` (a peer's control API, summarised); also the peer's ``--api`` flags. The commands'
logic is plain functions; the click commands only register them (docs/gateway.md)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from .cli import params
from .cli.app import cli, common, options, run
from .config import Settings

DEFAULT_GATEWAY = "127.0.0.1:8000"


def _check_api(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--api`` checked before torch or the network (``--api-public`` is eager, so known here)."""
    from .errors import ConfigError
    from .gateway.http import parse_bind

    if value is not None:
        try:
            parse_bind(value, allow_public=bool(ctx.params.get("api_public")))
        except ConfigError as exc:
            raise click.BadParameter(exc.message.removeprefix("--api "), ctx, param) from None
    return value


# the peer's control API flags (cli/node.py applies them to ``peer``)
api_options = options(
    click.option("--api-public", is_flag=True, default=None, is_eager=True,
                 help="allow a non-loopback --api address (the API has no authentication)"),
    click.option("--api", metavar="HOST:PORT", callback=_check_api,
                 help="serve GET /status and /metrics here (loopback only, unless --api-public); docs/gateway.md"),
)


@cli.command("status")
@common
@click.option("--api", "status_api", metavar="HOST:PORT", help="the peer's control API (default 127.0.0.1:8470)")
@click.option("--json", "json_out", is_flag=True, help="the raw /status object")
@click.option("--timeout", type=click.FloatRange(0.0, min_open=True), default=5.0, show_default=True)
def status_command(**values: Any) -> int:
    """A running peer's status, read from its control API (peer --api)."""
    values["json"] = values.pop("json_out")
    return run("status", cmd_status, values)


@cli.command("gateway")
@common
@click.option("--bootstrap", multiple=True, type=params.PEER_ADDR, metavar="MULTIADDR", help="bootstrap peer (repeatable)")
@click.option("--bootstrap-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="file of bootstrap multiaddrs (default bootstrap/peers.txt if present)")
@click.option("--listen", "http_listen", metavar="HOST:PORT", default=DEFAULT_GATEWAY, show_default=True,
              help="HTTP address (loopback only unless --public)")
@click.option("--public", is_flag=True, help="allow a non-loopback --listen address (the API has no authentication)")
@click.option("--p2p-listen", type=params.LISTEN_ADDR, metavar="MULTIADDR", default="/ip4/127.0.0.1/tcp/0", show_default=True,
              help="the gateway client's libp2p address")
@click.option("--unverified", is_flag=True, help="answer every request unverified (labelled so in p2p_infer.verified); "
              "default: verified, and a request asks for unverified with p2p_infer.unverified")
@click.option("--request-timeout", type=click.FloatRange(0.0, min_open=True), default=30.0, show_default=True,
              help="seconds per request to a peer")
@click.option("--ready-file", type=click.Path(path_type=Path, dir_okay=False), help="write {url, peer_id, pid} as JSON here once serving")
def gateway_command(**values: Any) -> int:
    """Serve an OpenAI-compatible HTTP API (embeddings, chat) through the network."""
    return run("gateway", cmd_gateway, values)


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from .gateway.http import parse_bind

    bind = parse_bind(args.http_listen, allow_public=args.public, flag="--listen", public_flag="--public")  # before joining
    from .cli.query import need_bootstrap

    bootstrap = need_bootstrap(settings)
    import trio

    from .gateway.server import run_gateway
    from .net.host import quiet_libp2p_logging

    quiet_libp2p_logging()
    client_options = {"listen": args.p2p_listen, "request_timeout": args.request_timeout}

    async def main() -> bool:
        """Serve until SIGINT or SIGTERM; a signal during start-up aborts it at once (False)."""
        ready = False
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                url = await nursery.start(lambda task_status: run_gateway(
                    bootstrap, bind, unverified=args.unverified, ready_file=args.ready_file, client_options=client_options,
                    task_status=task_status))
                ready = True
                print(url, flush=True)
        return ready

    return 0 if trio.run(main) else 130


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

