"""``p2p-infer generate`` and ``p2p-infer chat``: text generation through the network (docs/generation.md).

The chat template is applied, the answer streams to stdout token by token; ``--json`` prints
one object instead (``text``, ``tokens``, ``route``, ``verified``, ...). Verified by default:
``--unverified`` skips the re-execution and says so in the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .cli.app import cli, common, network, options, run
from .config import Settings


def _generation_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    return options(
        common,
        network,
        click.option("--model", default="smollm2-135m", show_default=True, help="smollm2-135m (the only generation model)"),
        click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True),
        click.option("--temperature", type=click.FloatRange(0.0), default=0.0, help="0 = greedy (default)"),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(0), default=0, show_default=True),
        click.option("--seed", type=int, default=0, help="sampling seed: the same seed gives the same tokens on any honest route"),
        click.option("--unverified", is_flag=True, help="skip re-execution by other providers (the result says unverified)"),
        click.option("--no-chat-template", is_flag=True, help="send the prompt as raw text"),
        click.option("--timeout", type=click.FloatRange(0.0, min_open=True), default=30.0, show_default=True,
                     help="seconds per request to a peer"),
    )(fn)


@cli.command("generate")
@_generation_flags
@click.option("--json", "json_out", is_flag=True, help="one JSON object on stdout instead of streamed text")
@click.argument("prompt")
def generate_command(**values: Any) -> int:
    """Generate text with a language model through the network."""
    values["json"] = values.pop("json_out")
    return run("generate", cmd_generate, values)


@cli.command("chat")
@_generation_flags
def chat_command(**values: Any) -> int:
    """An interactive chat loop through the network."""
    return run("chat", cmd_chat, values)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from .errors import UsageError
    from .proto.sampling import Sampling

    if args.model != "smollm2-135m":
        raise UsageError(f"generation is served for smollm2-135m only, not {args.model!r}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).validate()
    return {"max_new_tokens": args.max_new_tokens, "sampling": sampling, "verified": not args.unverified,
            "chat": not args.no_chat_template}


async def _answer(client: Any, prompt: str, options: dict[str, Any], stream: bool) -> dict[str, Any]:
    result = None
    async for piece in client.generate(prompt, **options):
        if piece.restart and stream:
            print("\n[verification caught a lying peer; regenerating without it]", file=sys.stderr, flush=True)
        elif piece.result is not None:
            result = piece.result
        elif stream:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    assert result is not None
    if stream:
        label = "verified" if result.verified else "UNVERIFIED"
        print(f"\n[{len(result.tokens)} tokens, {label}, route {' -> '.join(h['peer'][:8] + ':' + str(h['first']) + '-' + str(h['last']) for h in result.route)}]",
              file=sys.stderr)
    return result.to_json()


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    options = _options(args)
    import trio

    from .net.host import quiet_libp2p_logging
    from .node.client import Client
    from .cli.query import need_bootstrap

    addrs = need_bootstrap(settings)
    quiet_libp2p_logging()

    async def generate() -> dict[str, Any]:
        async with Client(addrs, trial=False, request_timeout=args.timeout) as client:
            return await _answer(client, args.prompt, options, stream=not args.json)

    out = trio.run(generate)
    if args.json:
        print(json.dumps(out))
    return 0


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    """One question per line; each answer streams back (no history between turns yet)."""
    options = _options(args)
    import trio

    from .net.host import quiet_libp2p_logging
    from .node.client import Client
    from .cli.query import need_bootstrap

    addrs = need_bootstrap(settings)
    quiet_libp2p_logging()

    async def chat() -> None:
        async with Client(addrs, trial=False, request_timeout=args.timeout) as client:
            while True:
                print("> ", end="", flush=True)
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line or line.strip() in ("/quit", "/exit"):
                    return
                if line.strip():
                    await _answer(client, line.strip(), options, stream=True)

    trio.run(chat)
    return 0

