"""Where a committee query's time goes, stage by stage: plain and committee-of-3 queries
alternated on 3 peers that each serve every stage, each committee query's judgement awaited
before the next query (so the third member's audit work after the answer lands on no timed
query), 50 ms apart. Prints, per mode, the total's median / mean / p95 and each stage's
median round trip, and the committee/plain ratios.

A third row, ``fan-out-2``, is the transport floor of any 2-of-k scheme on this box: the
plain forward request of each stage sent to two providers at once, both replies awaited,
with no committee logic (no candidate set, no signatures, no tickets). Its stages against
plain's show what sending twice costs here before the protocol adds anything.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/consensus_hops.py [--model minilm-l6] [--queries 30]

A committee stage's round trip runs from its start to its decision. The client starts each
stage on the previous stage's first answer (speculation, docs/consensus.md), so the stages
of a committee query overlap and their sum exceeds its total; the totals are what compare.

bench/consensus_latency.py is the benchmark of record (interleaved modes, background work
included); this one isolates each stage's own cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.ml.models import DigitsMLP, load_model  # noqa: E402
from p2p_infer.ml.tensors import encode_optional, encode_tensor  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.proto.forward import ForwardRequest, parse_forward_reply  # noqa: E402
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


async def fan_out(client: Client, model_name: str, inputs: object, stages: list[tuple[int, int]]) -> tuple[float, list[float]]:
    """Each stage's plain forward request to two of its providers at once, both awaited."""
    model = load_model(model_name)
    started = time.perf_counter()
    act = model.embed(inputs)
    hidden, mask, hops = encode_tensor(act.hidden), encode_optional(act.mask), []
    records = client.directory.records  # type: ignore[union-attr]
    for first, last in stages:
        peers = sorted(p for p, r in records.items() if any(s.first <= first and last <= s.last for s in r.shards))[:2]
        message = ForwardRequest(model.model_id, first, last, hidden, mask).to_wire()
        replies: list[object] = []
        hop_started = time.perf_counter()

        async def ask(peer: str) -> None:
            replies.append(await client._request(peer, message, timeout=10))

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        hops.append((time.perf_counter() - hop_started) * 1000)
        hidden, _ = parse_forward_reply(replies[0])  # type: ignore[arg-type]
    return (time.perf_counter() - started) * 1000, hops


async def run(bootstrap: str, model: str, n: int) -> dict[str, dict[str, object]]:
    inputs = inputs_for(model)
    rows: dict[str, list[tuple[float, list[float]]]] = {"plain": [], "committee-3": [], "fan-out-2": []}
    async with Client([bootstrap], unverified=True) as plain, Client([bootstrap], committee=3) as committee:
        for i in range(WARM_UP + n):
            for mode, client in (("plain", plain), ("committee-3", committee)):
                result = await client.run(model, inputs)
                if result.judged is not None:
                    await result.judged  # the audit member's answer, outside the next timed query
                await trio.sleep(0.05)
                if i >= WARM_UP:
                    rows[mode].append((result.total_ms, [h.round_trip_ms for h in result.route]))
            stages = [(h.first, h.last) for h in result.route]
            total, hops = await fan_out(plain, model, inputs, stages)
            await trio.sleep(0.05)
            if i >= WARM_UP:
                rows["fan-out-2"].append((total, hops))
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
    # the committee's stages overlap (speculation): their sum is not its time, so it is left out
    stage_sum = {mode: sum(row["stage_medians"]) for mode, row in table.items() if mode != "committee-3"}  # type: ignore[arg-type,misc]
    print(json.dumps({"model": args.model, "queries": args.queries, "ms": table, "committee_over_plain": ratios,
                      "stages_over_plain": {mode: round(v / stage_sum["plain"], 3) for mode, v in stage_sum.items()}}))


if __name__ == "__main__":
    main()
