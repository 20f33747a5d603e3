"""The demo: a local swarm on loopback (a bootstrap peer and 3 peers), real generation and
real queries through it, the checks against the models run locally, then the swarm stops.
``python -m p2p_infer.demo [question]``.

First SmolLM2-135M-Instruct answers a question through the 3 peers (layers 1-10 / 11-20 /
21-29, decode steps forwarded peer to peer), streamed with each token's latency, and the
tokens are checked against the same weights generating in this process. With one provider
per span the answer cannot be re-executed by another, so it is labelled UNVERIFIED (verified
generation needs two providers of every span: docs/generation.md).

Then the embedding query as before: each peer also serves MiniLM's remote layers as three
shards; the default query is verified on a committee of all 3 peers, then an optimistic query
(one executor per stage, re-executed with probability 0.5 after the answer) and an explicitly
unverified forwarded one, labelled UNVERIFIED."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .testing.harness import Swarm

SHARDS = ["minilm-l6:1-2", "minilm-l6:3-4", "minilm-l6:5-5"]
SPANS = ["smollm2-135m:1-10", "smollm2-135m:11-20", "smollm2-135m:21-29"]
SPLIT = [[*SHARDS, span] for span in SPANS]  # three providers of every MiniLM stage (the committee of 3), one per SmolLM2 span
MODES = ([], ["--optimistic", "0.5"], ["--unverified", "--forwarding"])
QUESTION = "What is the capital of France?"
TEXT = "Peers on a network share the work of running one model."
MAX_NEW_TOKENS = 48


async def _ask(bootstrap: str, question: str) -> tuple[Any, list[Any]]:
    from .node.client import Client

    pieces = []
    async with Client([bootstrap], trial=False, request_timeout=120) as client:
        async for piece in client.generate(question, max_new_tokens=MAX_NEW_TOKENS, verified=False):
            if piece.result is None:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                pieces.append(piece)
            else:
                return piece.result, pieces
    raise AssertionError("generation ended without a result")


def generation(swarm: Swarm, question: str) -> bool:
    """Ask SmolLM2 through the swarm; True if the tokens equal the local model's."""
    import trio

    from .ml.models import load_model
    from .ml.smollm2 import generate_local
    from .net.host import quiet_libp2p_logging
    from .proto.sampling import Sampling

    from .logs import configure_logging

    quiet_libp2p_logging()
    configure_logging("console", "warning")  # the in-process client's routine logs would interleave with the answer
    print(f"$ p2p-infer generate --unverified {json.dumps(question)}   (SmolLM2-135M-Instruct, greedy)\n", flush=True)
    result, pieces = trio.run(_ask, swarm.bootstrap.addr if swarm.bootstrap else "", question)
    ms = result.token_ms
    print("\n\nper-token latency, ms (the first includes the prompt's prefill and the client's first load of its layers):")
    print("  " + " ".join(f"{m:.0f}" for m in ms))
    decode = ms[1:] or ms
    print(f"  prefill of {result.prompt_tokens} tokens + first token: {ms[0]:.0f} ms; decode: median {statistics.median(decode):.0f} ms, "
          f"mean {statistics.fmean(decode):.0f} ms over {len(decode)} tokens ({result.decode}, {result.forwarded_tokens} tokens peer to peer)")
    print("  route: " + " -> ".join(f"{h['peer'][:12]}:{h['first']}-{h['last']}" for h in result.route))
    print("  UNVERIFIED: one provider per span, so no other peer could re-execute it (verified generation needs two)")
    model = load_model("smollm2-135m")
    local = generate_local(model, model.prompt_ids(question), MAX_NEW_TOKENS, Sampling())
    ok = local == result.tokens
    print("  the tokens equal SmolLM2 generating in this process" if ok else "  MISMATCH with SmolLM2 generating in this process")
    return ok


def main(argv: list[str] | None = None) -> int:
    question = " ".join(argv if argv is not None else sys.argv[1:]) or QUESTION
    with tempfile.TemporaryDirectory(prefix="p2p-infer-demo-") as tmp, Swarm(Path(tmp)) as swarm:
        started = time.monotonic()
        print("starting a bootstrap peer and 3 peers (separate processes on 127.0.0.1)...", flush=True)
        swarm.start_bootstrap()
        peers = swarm.start_peers(SPLIT, timeout=600)
        swarm.wait_discoverable(peers, timeout=180)
        print(f"swarm up in {time.monotonic() - started:.1f} s; bootstrap {swarm.bootstrap.addr if swarm.bootstrap else ''}")
        for p in peers:
            print(f"  {p.name}: {p.peer_id} serves {', '.join(p.serve)}")
        print()
        generated = generation(swarm, question)
        print(f"\nquery: {TEXT!r}\n", flush=True)
        for extra in MODES:
            print(f"$ p2p-infer query --compare {' '.join(extra)}".rstrip(), flush=True)
            result = swarm.cli("query", "--model", "minilm-l6", "--compare", *extra, TEXT)
            print(result.stdout)
        data = json.loads(swarm.cli("query", "--model", "minilm-l6", "--compare", "--json", TEXT).stdout)
        ok = data["local_check"]["match"] and data["verified"]
        print("verified split result matches the monolithic model" if ok else "MISMATCH or unverified against the monolithic model")
        print("stopping the swarm")
    return 0 if ok and generated else 1


if __name__ == "__main__":
    sys.exit(main())
