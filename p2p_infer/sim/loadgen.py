"""A light client that drives a simulation's query load: its own OS process, the real
:class:`~p2p_infer.node.client.Client` over real libp2p connections.

    python -m p2p_infer.sim.loadgen --bootstrap ADDR --out events.jsonl --mode committee ...

Queries arrive as a Poisson process (seeded), at most ``--concurrency`` in flight. Every
answer is checked against the model run whole in this process (the client holds the
weights anyway): an accepted answer that differs is a wrong result accepted. One JSON line
per query, and the client's reputation table once a second, go to ``--out``. In committee
mode a query is answered at each stage's first quorum and its other members are judged after
the answer: a ``judged`` line follows with the final verdicts (the query line's are
"pending" for members still out then).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import trio

from ..errors import P2PInferError
from .modes import client_options

AGREE_ATOL = 1e-4  # honest split runs match the whole model to ~1e-6; a liar's noise is 0.5


def sample_input(model: str, i: int) -> Any:
    if model == "digits-mlp":
        from ..ml.models import DigitsMLP

        data = DigitsMLP.dataset()[2]
        return data[i % len(data)].tolist()
    return f"simulated query number {i}: peers serve layers, clients check what they get"


def is_wrong(model: str, got: dict[str, Any], truth: dict[str, Any]) -> bool:
    key = "probabilities" if model == "digits-mlp" else "embedding"
    a, b = got.get(key, []), truth[key]
    return len(a) != len(b) or any(abs(x - y) > AGREE_ATOL for x, y in zip(a, b))


class Recorder:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, **event: Any) -> None:
        self.out.write(json.dumps({"t": time.time(), **event}) + "\n")
        self.out.flush()  # the runner tails this file for its progress line


def query_event(i: int, started: float, result: Any, wrong: bool) -> dict[str, Any]:
    verdicts: dict[str, str] = {}
    attempts = 0
    for stage in result.stages:
        attempts += int(stage.get("attempts", 1)) - 1
        for member, verdict in stage.get("verdicts", {}).items():
            verdicts[member] = verdict
    peers = [p for hop in result.route for p in hop.peer.split(",")]
    stages = [{"first": hop.first, "last": hop.last, "peers": hop.peer.split(","), "ms": hop.round_trip_ms} for hop in result.route]
    return {"kind": "query", "i": i, "t0": started, "ok": True, "wrong": wrong, "latency_ms": result.total_ms,
            "route": peers, "hops": len(result.route), "retries": result.retries + attempts,
            "failed_peers": list(result.failed_peers), "verdicts": verdicts, "mode": result.mode, "stages": stages}


async def record_judged(result: Any, i: int, rec: Recorder, timeout: float) -> None:
    """The final verdicts of a committee query, once its late members are judged (bounded)."""
    with trio.move_on_after(timeout):
        await result.judged
    verdicts: dict[str, str] = {}
    for stage in result.stages:
        verdicts.update(stage.get("verdicts", {}))
    rec.write(kind="judged", i=i, verdicts=verdicts, t_done=time.time())


INFLIGHT: dict[int, tuple[Any, float]] = {}  # query -> (its trio task, start): the watchdog reports stuck ones


def task_stacks(task: Any, depth: int = 0) -> list[str]:
    """Where ``task`` and its children wait: one line per coroutine frame (why a query outlived its timeout)."""
    out, coro = [], task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            out.append(f"{'  ' * depth}{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            out += task_stacks(child, depth + 1)
    return out


async def watchdog(rec: Recorder, limit_s: float) -> None:
    """A query past its own fail_after by 15 s is stuck in something that ignores cancellation: say where, once."""
    import traceback

    reported: set[int] = set()
    while True:
        await trio.sleep(5.0)
        for i, (task, started) in list(INFLIGHT.items()):
            if i not in reported and time.time() - started > limit_s + 15:
                reported.add(i)
                threads = {str(t): traceback.format_stack(f)[-6:] for t, f in sys._current_frames().items()}
                rec.write(kind="stuck", i=i, age_s=round(time.time() - started, 1), tasks=task_stacks(task), threads=threads)


async def one_query(client: Any, args: argparse.Namespace, i: int, truth: dict[str, Any], rec: Recorder) -> Any:
    started = time.time()
    INFLIGHT[i] = (trio.lowlevel.current_task(), started)
    try:
        return await _one_query(client, args, i, truth, rec, started)
    finally:
        INFLIGHT.pop(i, None)


async def _one_query(client: Any, args: argparse.Namespace, i: int, truth: dict[str, Any], rec: Recorder, started: float) -> Any:
    try:
        with trio.fail_after(args.query_timeout):
            result = await client.run(args.model, sample_input(args.model, i))
    except (P2PInferError, trio.TooSlowError) as exc:
        code = getattr(exc, "code", "timeout")
        rec.write(kind="query", i=i, t0=started, ok=False, wrong=False, error=str(exc)[:300], code=code,
                  latency_ms=(time.time() - started) * 1000)
        return None
    rec.write(**query_event(i, started, result, is_wrong(args.model, result.output, truth)))
    return result


async def warm_up(client: Any, model: Any, timeout: float) -> dict[str, Any]:
    """Run trial tasks until every provider in the directory passed or failed its trial.

    A committee needs k admitted providers per stage, and the client waits for trials only
    when no admitted peer covers a layer: without this, the first queries of a fresh client
    fail with "1 eligible candidates for a committee of 3" while trials trickle in."""
    from ..node import trials

    started = time.monotonic()
    act = model.sample_activation(random=True)
    pending: list[str] = []
    with trio.move_on_after(timeout):
        while True:
            await client.refresh()
            providers = {r.peer_id for r, _ in client.directory.shards_of(model.model_id)}
            pending = sorted(p for p in providers if p not in client.admission.passed and client.reputation.trusted(p))
            if providers and not pending:
                break
            await trials.trials_for_query(client, model, act)
            await trio.sleep(1.0)
    return {"warmup_s": round(time.monotonic() - started, 2), "untried_after_warmup": pending}


async def reputation_loop(client: Any, rec: Recorder) -> None:
    while True:
        rec.write(kind="reputation", scores=dict(client.reputation.scores))
        await trio.sleep(1.0)


def count_messages(client: Any) -> tuple[Counter[str], Counter[str]]:
    """Count what the client sends: requests by type (ticket, execute, forward, ping) and
    gossip by type, by wrapping its pool's ``request`` and its gossip's ``publish_soon`` (the
    model's message counts are checked against these, docs/simulations.md)."""
    requests: Counter[str] = Counter()
    published: Counter[str] = Counter()
    pool, gossip = client.pool, client.gossip
    request, publish_soon = pool.request, gossip.publish_soon if gossip is not None else None

    async def counted_request(peer_id: str, protocol: str, message: Any, **kw: Any) -> Any:
        requests[str(message.get("type", "?"))] += 1  # committee mode sends "forward" only as trials
        return await request(peer_id, protocol, message, **kw)

    def counted_publish(nursery: Any, message: Any) -> None:
        published[str(message.get("type", "?"))] += 1
        assert publish_soon is not None
        publish_soon(nursery, message)

    pool.request = counted_request
    if gossip is not None:
        gossip.publish_soon = counted_publish
    return requests, published


async def drive(args: argparse.Namespace, rec: Recorder) -> None:
    from ..node.client import Client

    values = {"committee": args.committee, "commit_timeout_s": args.commit_timeout, "max_reruns": args.max_reruns,
              "optimistic": args.optimistic}
    options = client_options(args.mode, values, Client.__init__)
    rng = random.Random(args.seed)
    async with Client(args.bootstrap, request_timeout=args.request_timeout, refresh_interval=2.0, **options) as client:
        model = await client.model(args.model)
        truths = {i: model.run_local(sample_input(args.model, i)) for i in range(args.offset, args.offset + args.queries)}
        warmup = await warm_up(client, model, args.warmup_timeout)
        requests, published = count_messages(client)  # from the load on: the warm-up's trials are not the load's
        rec.write(kind="client_ready", options={k: v for k, v in options.items()}, **warmup)
        limiter = trio.CapacityLimiter(args.concurrency)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reputation_loop, client, rec)
            nursery.start_soon(watchdog, rec, args.query_timeout)
            async with trio.open_nursery() as queries:
                for i in range(args.offset, args.offset + args.queries):
                    await trio.sleep(rng.expovariate(args.rate))
                    await limiter.acquire_on_behalf_of(i)
                    queries.start_soon(_limited, limiter, i, client, args, truths[i], rec, queries)
            rec.write(kind="reputation", scores=dict(client.reputation.scores))
            rec.write(kind="messages", requests=dict(requests), published=dict(published))
            nursery.cancel_scope.cancel()
    rec.write(kind="client_done")


async def _limited(limiter: trio.CapacityLimiter, i: int, client: Any, args: argparse.Namespace, truth: dict[str, Any], rec: Recorder,
                   queries: trio.Nursery) -> None:
    try:
        result = await one_query(client, args, i, truth, rec)
    finally:
        limiter.release_on_behalf_of(i)
    if result is not None and getattr(result, "judged", None) is not None:  # judged off the query's slot, as a client does
        queries.start_soon(record_judged, result, i, rec, 3 * args.request_timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="p2p_infer.sim.loadgen")
    p.add_argument("--bootstrap", action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--mode", default="committee")
    p.add_argument("--committee", type=int, default=3)
    p.add_argument("--commit-timeout", type=float, default=2.0)
    p.add_argument("--optimistic", type=float, default=0.5)
    p.add_argument("--max-reruns", type=int, default=2)
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument("--query-timeout", type=float, default=60.0)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-timeout", type=float, default=90.0, help="seconds to spend admitting providers by trial first")
    args = p.parse_args(argv)
    from ..logs import configure_logging

    configure_logging("json", "info")  # the client log in the swarm directory says why a query failed
    with open(args.out, "a") as out:
        rec = Recorder(out)
        try:
            trio.run(drive, args, rec)
        except P2PInferError as exc:
            rec.write(kind="client_failed", error=exc.message)
            sys.stderr.write(f"error: {exc.message}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
