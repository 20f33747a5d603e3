"""Where a committee query's time goes, stage by stage: plain and committee-of-3 queries
alternated on 3 peers that each serve every stage, each committee query's judgement awaited
before the next query (so the third member's audit work after the answer lands on no timed
query), 50 ms apart. Prints, per mode, the total's median / mean / p95 and each stage's
median round trip, and the committee/plain ratios.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/consensus_hops.py [--model minilm-l6] [--queries 30]

bench/consensus_latency.py is the benchmark of record (interleaved modes, background work
included); this one isolates each stage's own cost.
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

from p2p_infer.ml.models import DigitsMLP  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402

STAGES = {"minilm-l6": ["minilm-l6:1-2", "minilm-l6:3-4", "minilm-l6:5-5"], "digits-mlp": ["digits-mlp:1-1", "digits-mlp:2-2", "digits-mlp:3-3"]}
WARM_UP = 3


def inputs_for(model: str) -> object:
    if model == "minilm-l6":
        return "peers share the work of running one model so that no single machine holds it all"
    return DigitsMLP.dataset()[2][0].tolist()


def summary(rows: list[tuple[float, list[float]]]) -> dict[str, object]:
    totals = sorted(t for t, _ in rows)
    hops = [round(statistics.median(h[j] for _, h in rows), 2) for j in range(len(rows[0][1]))]
    return {"median": round(statistics.median(totals), 2), "mean": round(statistics.mean(totals), 2),
            "p95": round(totals[int(0.95 * (len(totals) - 1))], 2), "stage_medians": hops}


async def run(bootstrap: str, model: str, n: int) -> dict[str, dict[str, object]]:
    inputs = inputs_for(model)
    rows: dict[str, list[tuple[float, list[float]]]] = {"plain": [], "committee-3": []}
    async with Client([bootstrap], unverified=True) as plain, Client([bootstrap], committee=3) as committee:
        for i in range(WARM_UP + n):
            for mode, client in (("plain", plain), ("committee-3", committee)):
                result = await client.run(model, inputs)
                if result.judged is not None:
                    await result.judged  # the audit member's answer, outside the next timed query
                await trio.sleep(0.05)
                if i >= WARM_UP:
                    rows[mode].append((result.total_ms, [h.round_trip_ms for h in result.route]))
    return {mode: summary(r) for mode, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm-l6", choices=list(STAGES))
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    quiet_libp2p_logging()
    with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=300) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([STAGES[args.model]] * 3)
        swarm.wait_discoverable(timeout=120)
        table = trio.run(run, swarm.bootstrap.addr, args.model, args.queries)
    plain, committee = table["plain"], table["committee-3"]
    ratios = {k: round(committee[k] / plain[k], 3) for k in ("median", "mean", "p95")}  # type: ignore[operator]
    print(json.dumps({"model": args.model, "queries": args.queries, "ms": table, "committee_over_plain": ratios}))


if __name__ == "__main__":
    main()
