"""Consensus latency: committee of 3, optimistic mode and a spot-checked plan against
*plain* routing on the same route in the same run: median, mean and p95 of each over >= 50
queries after warm-up, and the ratios to plain. The modes' queries are interleaved (plain,
committee, spot-check, optimistic, plain, ...) so machine load drifts affect them alike.

    .venv/bin/python bench/consensus_latency.py [--queries 50] [--models digits-mlp minilm-l6]
        [--modes plain committee-3 optimistic] [--p 0.1] [--same-route] [--link-delay-ms 0 --link-jitter-ms 0]

Targets (issue 9): committee/plain <= 1.5x median and <= 2x p95, optimistic/plain <= 1.1x
median; printed as ``targets_met``. What is timed is the answer (``result.total_ms``).
A committee decides each stage at its first two agreeing answers; the third member is
judged after the answer (its CPU lands on the queries after it, as it does for a user),
and every judgement is awaited at the end of the run, where a member not judged ``agree``
is counted in ``failed_or_disagreed``. An optimistic query's check likewise runs after the
answer, in the background.

``--same-route`` (what bench/optimistic_latency.py did): every client shares one routing
view (timed throughput, round trips) and known-answer re-trials are off, so all modes take
the same route (printed as ``same_route``), and each optimistic check is awaited after its
query, outside the timed window and before the next one (``check_ms_after_answer``).

``--link-delay-ms D --link-jitter-ms J`` start the peers with ``--test-delay-ms D
--test-jitter-ms J``: every reply is held D ms plus up to J (uniform), an emulated link's
round trip (this kernel has no netem), which costs no CPU. On loopback the three peers, the
bootstrap and the client share two cores, so the committee's extra work is all on the
critical path; with a link delay the comparison is closer to peers on their own machines.

The first mode is the baseline and says "unverified" explicitly, so "plain" is plain
routing. Each line also prints ``os.getloadavg()`` before and after the run and the
``uptime`` line: the box is shared.

Three peers each serve every stage (MiniLM stages 1-2, 3-4, 5-5; digits 1-1, 2-2, 3-3),
so a committee of 3 is all of them. On one 2-core machine the three members compete for
the cores, so the digits rows (negligible compute) isolate the protocol's own cost per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.errors import P2PInferError  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.ml.models import DigitsMLP  # noqa: E402

STAGES = {"minilm-l6": ["minilm-l6:1-2", "minilm-l6:3-4", "minilm-l6:5-5"], "digits-mlp": ["digits-mlp:1-1", "digits-mlp:2-2", "digits-mlp:3-3"]}
MODE_NAMES = ("plain", "committee-3", "spot-check", "optimistic")
WARM_UP = 3


def modes(names: list[str], p: float) -> dict[str, dict[str, object]]:
    """Client keywords per mode, in interleaving order; plain first (the baseline)."""
    table: dict[str, tuple[str, dict[str, object]]] = {
        "plain": ("plain", {"unverified": True}),
        "committee-3": ("committee-3", {"committee": 3}),
        "spot-check": (f"spot-check-{p:g}", {"spot_check": p}),  # a check of its own: no committee added, never "unverified"
        "optimistic": (f"optimistic-{p:g}", {"optimistic": p}),  # one executor + signed commitment, re-executed after with p
    }
    return dict(table[n] for n in ["plain", *[n for n in names if n != "plain"]])


def stats(runs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(runs), 2), "mean": round(statistics.mean(runs), 2),
            "p95": round(sorted(runs)[int(0.95 * (len(runs) - 1))], 2)}


class Run:
    """One model's interleaved queries: times, failures, routes and check times per mode."""

    def __init__(self, kinds: dict[str, dict[str, object]]) -> None:
        self.kinds = kinds
        self.times: dict[str, list[float]] = {mode: [] for mode in kinds}
        self.failed: dict[str, list[str]] = {mode: [] for mode in kinds}
        self.routes: dict[str, set[tuple[str, ...]]] = {mode: set() for mode in kinds}
        self.check_ms: list[float] = []
        self.judged: list[Any] = []

    async def query(self, mode: str, c: Client, name: str, inputs: object, timed: bool, same_route: bool) -> None:
        try:
            r = await c.run(name, inputs)
        except P2PInferError as exc:
            self.failed[mode].append(f"{exc.code}: {exc.message[:200]}")
            return
        assert len(r.route) == 3
        if r.judged is not None:
            self.judged.append(r)
        if r.check is not None and same_route:  # awaited outside the timed window, before the next query
            started = time.perf_counter()
            report = await r.check
            if not all(s["outcome"] in ("agree", "not-drawn") for s in report["stages"]):  # honest peers
                self.failed[mode].append(f"check: {report['stages']}"[:300])
            if timed and report["ran"]:
                self.check_ms.append((time.perf_counter() - started) * 1000)
        if timed:
            self.times[mode].append(r.total_ms)
            self.routes[mode].add(tuple(h.peer for h in r.route))

    async def settle(self) -> None:
        """Every committee judgement (the members answering after a quorum): all must agree."""
        for r in self.judged:
            await r.judged
            if not all(sum(v == "agree" for v in s["verdicts"].values()) == 3 for s in r.stages):
                self.failed["committee-3"].append(f"not all members agreed: {[s['verdicts'] for s in r.stages]}"[:300])


async def times(bootstrap: str, name: str, inputs: object, n: int, kinds: dict[str, dict[str, object]], same_route: bool) -> Run:
    run = Run(kinds)
    async with AsyncExitStack() as stack:
        clients = {mode: await stack.enter_async_context(Client([bootstrap], **kw)) for mode, kw in kinds.items()}
        if same_route:
            plain = next(iter(clients.values()))
            for c in clients.values():
                c.admission.retrial = 0.0  # no known-answer re-trials inside the timed queries of any mode
                c.throughput, c.rtt_ms = plain.throughput, plain.rtt_ms  # one routing view: the same route
        for i in range(WARM_UP + n):
            for mode, c in clients.items():
                await run.query(mode, c, name, inputs, i >= WARM_UP, same_route)
        await run.settle()
    return run


def report(name: str, n: int, run: Run, same_route: bool) -> dict:
    table = {mode: stats(r) for mode, r in run.times.items() if r}
    base = next(iter(run.kinds))
    ratios = {mode: {k: round(v / table[base][k], 3) for k, v in row.items()} for mode, row in table.items() if mode != base}
    targets = {}
    committee = ratios.get("committee-3")
    if committee:
        targets |= {"committee_median_le_1.5x": committee["median"] <= 1.5, "committee_p95_le_2x": committee["p95"] <= 2.0}
    optimistic = next((r for m, r in ratios.items() if m.startswith("optimistic")), None)
    if optimistic:
        targets["optimistic_median_le_1.1x"] = optimistic["median"] <= 1.1
    line = {"model": name, "queries": n, "ms": table, "ratio_to_plain": ratios, "targets_met": targets,
            "failed_or_disagreed": {mode: len(f) for mode, f in run.failed.items()},
            "failures": {m: f[:3] for m, f in run.failed.items() if f}}
    if same_route:
        distinct = {m: sorted(r) for m, r in run.routes.items()}
        line |= {"same_route": len({tuple(r) for r in distinct.values()}) == 1,
                 "check_ms_after_answer": stats(run.check_ms) if run.check_ms else None, "queries_with_a_check": len(run.check_ms)}
    return line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--models", nargs="+", default=list(STAGES))
    parser.add_argument("--modes", nargs="+", choices=MODE_NAMES, default=list(MODE_NAMES))
    parser.add_argument("--p", type=float, default=0.1, help="spot-check and optimistic re-execution probability per stage")
    parser.add_argument("--same-route", action="store_true", help="one routing view for all clients; optimistic checks awaited")
    parser.add_argument("--link-delay-ms", type=float, default=0.0, help="every peer reply held this long (an emulated link)")
    parser.add_argument("--link-jitter-ms", type=float, default=0.0, help="plus up to this much, uniform")
    args = parser.parse_args()
    quiet_libp2p_logging()
    kinds = modes(args.modes, args.p)
    for name in args.models:
        inputs = "peers share the work of running one model so that no single machine holds it all" if name == "minilm-l6" else DigitsMLP.dataset()[2][0].tolist()
        with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=300) as swarm:
            swarm.start_bootstrap()
            swarm.start_peers([STAGES[name]] * 3, extra_args=["--test-delay-ms", str(args.link_delay_ms), "--test-jitter-ms", str(args.link_jitter_ms)])
            swarm.wait_discoverable(timeout=120)
            load_before = os.getloadavg()
            run = trio.run(times, swarm.bootstrap.addr, name, inputs, args.queries, kinds, args.same_route)
            line = report(name, args.queries, run, args.same_route)
            line["link_delay_ms"] = [args.link_delay_ms, args.link_jitter_ms]
            line["loadavg_before_after"] = [[round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]]
            line["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
