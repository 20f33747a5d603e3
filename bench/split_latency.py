"""Split inference latency: 3 peers in separate processes on loopback vs the same model
monolithic in this process, median over repeated queries after warm-up.

    .venv/bin/python bench/split_latency.py [--queries 30] [--threads 1]

Both sides use the same torch thread count per process. MiniLM uses a 32-token
sentence; the digits MLP uses test-split images. Prints one JSON object per model/mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.ml.models import DigitsMLP, load_model  # noqa: E402

SPLITS = {
    "minilm-l6": [["minilm-l6:1-2"], ["minilm-l6:3-4"], ["minilm-l6:5-5"]],
    "digits-mlp": [["digits-mlp:1-1"], ["digits-mlp:2-2"], ["digits-mlp:3-3"]],
}


def sentence_of_32_tokens(model) -> str:
    words = "peers share the work of running one model so that no single machine holds it all and none sees the input".split()
    text = ""
    for w in words * 4:
        candidate = (text + " " + w).strip()
        if len(model.tokenizer(candidate)["input_ids"]) > 32:
            break
        text = candidate
    assert len(model.tokenizer(text)["input_ids"]) == 32
    return text


def timed(fn, n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def split_times(bootstrap: str, name: str, inputs, n: int, forwarding: bool) -> tuple[list[float], list[list[float]]]:
    async with Client([bootstrap], forwarding=forwarding, unverified=True) as c:
        for _ in range(5):
            await c.run(name, inputs)
        totals, compute = [], []
        for _ in range(n):
            r = await c.run(name, inputs)
            totals.append(r.total_ms)
            compute.append([h.compute_ms for h in r.route])
            assert len(r.route) == 3 and not r.failed_peers
        return totals, compute


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(SPLITS))
    args = parser.parse_args()
    quiet_libp2p_logging()
    torch.set_num_threads(args.threads)
    for name in args.models:
        model = load_model(name)
        inputs = sentence_of_32_tokens(model) if name == "minilm-l6" else DigitsMLP.dataset()[2][0].tolist()
        mono = timed(lambda: model.run_local(inputs), args.queries)
        with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=300) as swarm:
            swarm.start_bootstrap()
            swarm.start_peers(SPLITS[name])
            swarm.wait_discoverable(timeout=120)
            for forwarding in (False, True):
                totals, compute = trio.run(split_times, swarm.bootstrap.addr, name, inputs, args.queries, forwarding)
                mono_ms, split_ms = statistics.median(mono), statistics.median(totals)
                remote_compute = statistics.median(sum(c) for c in compute)
                print(json.dumps({
                    "model": name,
                    "mode": "forwarding" if forwarding else "client-driven",
                    "queries": args.queries,
                    "torch_threads_per_process": args.threads,
                    "monolithic_median_ms": round(mono_ms, 2),
                    "split_median_ms": round(split_ms, 2),
                    "ratio": round(split_ms / mono_ms, 3),
                    "overhead_per_hop_ms": round((split_ms - mono_ms) / 3, 2),
                    "remote_compute_median_ms": round(remote_compute, 2),
                    "split_p95_ms": round(sorted(totals)[int(0.95 * (len(totals) - 1))], 2),
                }), flush=True)


if __name__ == "__main__":
    main()
