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
        click.option("--client-driven", is_flag=True,
                     help="send every decode step to each span's peer from here (default: forwarded peer to peer)"),
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
    from .cli.query import need_bootstrap

    addrs = need_bootstrap(settings)
    quiet_libp2p_logging()

    async def chat() -> None:
        async with Client(addrs, trial=False, request_timeout=args.timeout) as client:
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

    trio.run(chat)
    return 0
