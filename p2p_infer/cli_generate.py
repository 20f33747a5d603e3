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
        p.add_argument("--client-driven", action="store_true",
                       help="send every decode step to each span's peer from here (default: forwarded peer to peer)")
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
            "chat": not args.no_chat_template, "forwarding": not args.client_driven}


async def _answer(client: Any, prompt: Any, options: dict[str, Any], stream: bool) -> dict[str, Any]:
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


class Conversation:
    """The chat so far, as the chat template wants it: each turn is generated from the whole
    conversation (new sessions per turn, the history prefilled). The oldest turns are dropped
    when the conversation and the answer would pass a session's token limit."""

    def __init__(self, max_tokens: int, max_new_tokens: int) -> None:
        self.messages: list[dict[str, str]] = []
        self.budget = max_tokens - max_new_tokens

    def ask(self, text: str, count: Callable[[list[dict[str, str]]], int]) -> list[dict[str, str]]:
        self.messages.append({"role": "user", "content": text})
        while len(self.messages) > 1 and count(self.messages) > self.budget:
            del self.messages[:2]  # the oldest question and its answer
        return list(self.messages)

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def reset(self) -> None:
        self.messages.clear()


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    """One message per line; the answer streams back, and the conversation is kept (``/reset``
    forgets it, ``/quit`` ends)."""
    options = _options(args)
    if not options["chat"]:
        from .errors import UsageError

        raise UsageError("chat keeps a conversation through the chat template; --no-chat-template is for generate")
    import trio

    from .net.host import quiet_libp2p_logging
    from .node.client import Client
    from .node.peer import bootstrap_addrs

    quiet_libp2p_logging()

    async def run() -> None:
        async with Client(bootstrap_addrs(settings), trial=False, request_timeout=args.timeout) as client:
            model = await client.model(args.model)
            talk = Conversation(model.max_tokens, args.max_new_tokens)
            while True:
                print("> ", end="", flush=True)
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line or line.strip() in ("/quit", "/exit"):
                    return
                if line.strip() == "/reset":
                    talk.reset()
                    print("[conversation forgotten]", file=sys.stderr)
                elif line.strip():
                    messages = talk.ask(line.strip(), lambda m: len(model.prompt_ids(m, True)))
                    talk.answered((await _answer(client, messages, options, stream=True))["text"])

    trio.run(run)
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat}
