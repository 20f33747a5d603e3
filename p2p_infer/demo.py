"""The demo: a local swarm on loopback (a bootstrap peer and 3 peers, each serving MiniLM's
remote layers as three shards), real queries through it, the check against the model run
locally, then the swarm stops. ``python -m p2p_infer.demo [text]``.

The default query is verified: each of the three stages runs on a committee of all 3 peers.
Then an optimistic query (one executor per stage, re-executed with probability 0.5 after
the answer) and an explicitly unverified forwarded one, labelled UNVERIFIED."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .testing.harness import Swarm

SHARDS = ["minilm-l6:1-2", "minilm-l6:3-4", "minilm-l6:5-5"]
SPLIT = [SHARDS, SHARDS, SHARDS]  # three providers of every stage: enough for the default committee of 3
MODES = ([], ["--optimistic", "0.5"], ["--unverified", "--forwarding"])


def main(argv: list[str] | None = None) -> int:
    text = " ".join(argv if argv is not None else sys.argv[1:]) or "Peers on a network share the work of running one model."
    with tempfile.TemporaryDirectory(prefix="p2p-infer-demo-") as tmp, Swarm(Path(tmp)) as swarm:
        started = time.monotonic()
        print("starting a bootstrap peer and 3 peers (separate processes on 127.0.0.1)...", flush=True)
        swarm.start_bootstrap()
        peers = swarm.start_peers(SPLIT)
        swarm.wait_discoverable(peers)
        print(f"swarm up in {time.monotonic() - started:.1f} s; bootstrap {swarm.bootstrap.addr if swarm.bootstrap else ''}")
        for p in peers:
            print(f"  {p.name}: {p.peer_id} serves {', '.join(p.serve)}")
        print(f"\nquery: {text!r}\n", flush=True)
        for extra in MODES:
            print(f"$ p2p-infer query --compare {' '.join(extra)}".rstrip(), flush=True)
            result = swarm.cli("query", "--model", "minilm-l6", "--compare", *extra, text)
            print(result.stdout)
        data = json.loads(swarm.cli("query", "--model", "minilm-l6", "--compare", "--json", text).stdout)
        ok = data["local_check"]["match"] and data["verified"]
        print("verified split result matches the monolithic model" if ok else "MISMATCH or unverified against the monolithic model")
        print("stopping the swarm")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
