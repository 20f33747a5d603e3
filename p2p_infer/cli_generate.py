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

from .config import Settings


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], network: Callable[[argparse.ArgumentParser], None]) -> None:
    for name, helptext in (("generate", "generate text with a language model through the network"),
                           ("chat", "an interactive chat loop through the network")):
        p = sub.add_parser(name, help=helptext)
        common(p)
        network(p)
        p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the only generation model)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same tokens on any honest route")
        p.add_argument("--unverified", action="store_true", help="skip re-execution by other providers (the result says unverified)")
        p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request to a peer")
        if name == "generate":
            p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of streamed text")
            p.add_argument("prompt")


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
    from .node.peer import bootstrap_addrs

    quiet_libp2p_logging()

    async def run() -> dict[str, Any]:
        async with Client(bootstrap_addrs(settings), trial=False, request_timeout=args.timeout) as client:
            return await _answer(client, args.prompt, options, stream=not args.json)

    out = trio.run(run)
    if args.json:
        print(json.dumps(out))
    return 0


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    """One question per line; each answer streams back (no history between turns yet)."""
    options = _options(args)
    import trio

    from .net.host import quiet_libp2p_logging
    from .node.client import Client
    from .node.peer import bootstrap_addrs

    quiet_libp2p_logging()

    async def run() -> None:
        async with Client(bootstrap_addrs(settings), trial=False, request_timeout=args.timeout) as client:
            while True:
                print("> ", end="", flush=True)
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line or line.strip() in ("/quit", "/exit"):
                    return
                if line.strip():
                    await _answer(client, line.strip(), options, stream=True)

    trio.run(run)
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat}
