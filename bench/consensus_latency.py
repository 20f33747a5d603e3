"""Consensus latency: committee of 3 (and a spot-checked plan) against *plain* routing on
the same route in the same run: median, mean and p95 of each over >= 50 queries after
warm-up, and the ratios to plain. The modes' queries are interleaved (plain, committee,
spot-check, plain, ...) so machine load drifts affect them alike.

    .venv/bin/python bench/consensus_latency.py [--queries 50]

Targets (issue 9): committee/plain <= 1.5x median and <= 2x p95, optimistic/plain <= 1.1x
median; printed as ``targets_met``. An optimistic query's time is until its answer (its check
runs after, in the background, as it does for a user; its CPU lands on the queries after it).
``MODES`` is a list: one entry (name, Client keywords) adds a mode to the interleaving. The
first entry is the baseline and says "unverified" explicitly where the client knows the
word (once committees are the default), so "plain" is plain routing before and after.
Each line also prints ``os.getloadavg()`` before and after the run: the box is shared.

Three peers each serve every stage (MiniLM stages 1-2, 3-4, 5-5; digits 1-1, 2-2, 3-3),
so a committee of 3 is all of them. On one 2-core machine the three members compete for
the cores, so the digits rows (negligible compute) isolate the protocol's own cost per stage.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.errors import P2PInferError  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.ml.models import DigitsMLP  # noqa: E402

STAGES = {"minilm-l6": ["minilm-l6:1-2", "minilm-l6:3-4", "minilm-l6:5-5"], "digits-mlp": ["digits-mlp:1-1", "digits-mlp:2-2", "digits-mlp:3-3"]}


# plain routing, explicitly, where the client has a verified default (issue 9)
PLAIN: dict[str, object] = {"unverified": True} if "unverified" in inspect.signature(Client).parameters else {}
MODES: list[tuple[str, dict[str, object]]] = [
    ("plain", PLAIN),
    ("committee-3", {"committee": 3}),
    ("spot-check-0.1", {"spot_check": 0.1}),  # a check of its own: no committee added, never "unverified"
    ("optimistic-0.1", {"optimistic": 0.1}),  # one executor + signed commitment, re-executed after the answer with p = 0.1
]
BASELINE = MODES[0][0]


def stats(runs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(runs), 2), "mean": round(statistics.mean(runs), 2),
            "p95": round(sorted(runs)[int(0.95 * (len(runs) - 1))], 2)}


async def times(bootstrap: str, name: str, inputs, n: int) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Each mode's query times after warm-up, and the queries that failed (named, not
    dropped silently: on a loaded box a member can miss its commit deadline)."""
    out: dict[str, list[float]] = {mode: [] for mode, _ in MODES}
    failed: dict[str, list[str]] = {mode: [] for mode, _ in MODES}
    judged = []
    async with AsyncExitStack() as stack:
        clients = {mode: await stack.enter_async_context(Client([bootstrap], **kw)) for mode, kw in MODES}
        for i in range(3 + n):
            for mode, c in clients.items():
                try:
                    r = await c.run(name, inputs)
                except P2PInferError as exc:
                    failed[mode].append(f"{exc.code}: {exc.message[:200]}")
                    continue
                assert len(r.route) == 3
                if mode == "committee-3":
                    judged.append(r)
                if i >= 3:  # after warm-up
                    out[mode].append(r.total_ms)
        for r in judged:  # members answering after a stage's quorum are judged after the answer (their CPU lands on later queries)
            await r.judged
            if not all(sum(v == "agree" for v in s["verdicts"].values()) == 3 for s in r.stages):
                failed["committee-3"].append(f"not all members agreed: {[s['verdicts'] for s in r.stages]}"[:300])
    return out, failed


def report(name: str, n: int, runs: dict[str, list[float]], failed: dict[str, list[str]]) -> dict:
    table = {mode: stats(r) for mode, r in runs.items()}
    ratios = {mode: {k: round(v / table[BASELINE][k], 3) for k, v in row.items()} for mode, row in table.items() if mode != BASELINE}
    committee, optimistic = ratios["committee-3"], ratios["optimistic-0.1"]
    return {"model": name, "queries": n, "ms": table, "ratio_to_plain": ratios,
            "targets_met": {"committee_median_le_1.5x": committee["median"] <= 1.5, "committee_p95_le_2x": committee["p95"] <= 2.0,
                            "optimistic_median_le_1.1x": optimistic["median"] <= 1.1},
            "failed_or_disagreed": {mode: len(f) for mode, f in failed.items()}, "failures": {m: f[:3] for m, f in failed.items() if f}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--models", nargs="+", default=list(STAGES))
    args = parser.parse_args()
    quiet_libp2p_logging()
    for name in args.models:
        inputs = "peers share the work of running one model so that no single machine holds it all" if name == "minilm-l6" else DigitsMLP.dataset()[2][0].tolist()
        with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=300) as swarm:
            swarm.start_bootstrap()
            swarm.start_peers([STAGES[name]] * 3)
            swarm.wait_discoverable(timeout=120)
            load_before = os.getloadavg()
            runs, failed = trio.run(times, swarm.bootstrap.addr, name, inputs, args.queries)
            line = report(name, args.queries, runs, failed)
            line["loadavg_before_after"] = [[round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
