"""Batching: one batched query of 16 inputs against 16 single queries of the same inputs,
through the same swarm in the same run, for plain routing and the verified default
(a committee of 3 per stage). Rounds are interleaved (batch, singles, batch, ...) so load
drifts affect both alike; each round's 16 texts are new (no cache helps either side).

    .venv/bin/python bench/batch_latency.py [--rounds 12] [--batch 16] [--modes plain,committee-3]

Prints, per mode: the wall time of one batch of B and of B single queries one after the
other (median, mean, p95 over the rounds), their ratio (singles / batch: the speed-up),
and per-input time. Three peers each serve minilm-l6 layers 1-5 (committees of 3 are all
of them). ``os.getloadavg()`` is printed before and after: the box is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402

MODES = {"plain": {"unverified": True}, "committee-3": {}}
WORDS = ("peer network layer model volunteer route shard verify committee proof tensor batch client "
         "query latency stage answer gossip record signature reputation").split()


def stats(runs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(runs), 1), "mean": round(statistics.mean(runs), 1),
            "p95": round(sorted(runs)[int(0.95 * (len(runs) - 1))], 1)}


def texts(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]


async def measure(addr: str, options: dict[str, object], rounds: int, batch: int, rng: random.Random) -> dict[str, object]:
    batched, singles = [], []
    async with Client([addr], **options) as c:  # type: ignore[arg-type]
        for _ in range(2):  # warm-up: trials, round trips, first-use costs
            await c.embed(texts(rng, batch))
            await c.embed(texts(rng, 1)[0])
        for _ in range(rounds):
            inputs = texts(rng, batch)
            start = time.perf_counter()
            result = await c.embed(inputs)
            batched.append((time.perf_counter() - start) * 1000)
            assert result.batch == batch
            start = time.perf_counter()
            for text in inputs:
                await c.embed(text)
            singles.append((time.perf_counter() - start) * 1000)
    ratios = [s / b for s, b in zip(singles, batched)]
    return {"batch_ms": stats(batched), "singles_ms": stats(singles), "speedup_singles_over_batch": stats(ratios),
            "per_input_ms": {"batch": round(statistics.median(batched) / batch, 1),
                             "single": round(statistics.median(singles) / batch, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--modes", default="plain,committee-3")
    args = parser.parse_args()
    quiet_libp2p_logging()
    rng = random.Random(7)
    print(json.dumps({"load_before": os.getloadavg(), "rounds": args.rounds, "batch": args.batch}))
    with tempfile.TemporaryDirectory() as work, Swarm(Path(work), record_ttl=60) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([["minilm-l6:1-5"]] * 3, timeout=240)
        swarm.wait_discoverable(timeout=120)
        for mode in args.modes.split(","):
            out = trio.run(measure, swarm.bootstrap.addr, MODES[mode], args.rounds, args.batch, rng)
            print(json.dumps({"mode": mode, **out}), flush=True)
    print(json.dumps({"load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
