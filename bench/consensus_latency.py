"""Consensus latency: committee of 3 vs plain routing on the same route, median over
repeated queries after warm-up. (Committees of 1 no longer exist: k >= 3, docs/consensus.md.)

    .venv/bin/python bench/consensus_latency.py [--queries 20]

Three peers each serve every stage (MiniLM stages 1-2, 3-4, 5-5; digits 1-1, 2-2, 3-3),
so a committee of 3 is all of them. On one 2-core machine the three members compete for
the cores, so the digits rows (negligible compute) isolate the protocol's own cost per stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.ml.models import DigitsMLP, load_model  # noqa: E402

STAGES = {"minilm-l6": ["minilm-l6:1-2", "minilm-l6:3-4", "minilm-l6:5-5"], "digits-mlp": ["digits-mlp:1-1", "digits-mlp:2-2", "digits-mlp:3-3"]}


async def times(bootstrap: str, name: str, inputs, n: int, committee: int | None) -> list[float]:
    async with Client([bootstrap], committee=committee) as c:
        for _ in range(3):
            await c.run(name, inputs)
        out = []
        for _ in range(n):
            r = await c.run(name, inputs)
            assert len(r.route) == 3
            if committee:
                assert all(sum(v == "agree" for v in s["verdicts"].values()) == committee for s in r.stages)
            out.append(r.total_ms)
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=list(STAGES))
    args = parser.parse_args()
    quiet_libp2p_logging()
    for name in args.models:
        model = load_model(name)
        inputs = "peers share the work of running one model so that no single machine holds it all" if name == "minilm-l6" else DigitsMLP.dataset()[2][0].tolist()
        with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=300) as swarm:
            swarm.start_bootstrap()
            swarm.start_peers([STAGES[name]] * 3)
            swarm.wait_discoverable(timeout=120)
            medians, means, p95 = {}, {}, {}
            for label, committee in (("plain", None), ("committee-3", 3)):
                runs = trio.run(times, swarm.bootstrap.addr, name, inputs, args.queries, committee)
                medians[label], means[label] = statistics.median(runs), statistics.mean(runs)
                p95[label] = sorted(runs)[int(0.95 * (len(runs) - 1))]
            print(json.dumps({
                "model": name,
                "queries": args.queries,
                "plain_median_ms": round(medians["plain"], 2),
                "committee3_median_ms": round(medians["committee-3"], 2),
                "ratio_k3_vs_plain": round(medians["committee-3"] / medians["plain"], 3),
                "mean_ms": {k: round(v, 1) for k, v in means.items()},
                "p95_ms": {k: round(v, 1) for k, v in p95.items()},
                "extra_per_stage_ms_k3_vs_plain": round((medians["committee-3"] - medians["plain"]) / 3, 2),
            }), flush=True)
        del model


if __name__ == "__main__":
    main()
