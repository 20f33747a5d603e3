"""The client's side of optimistic mode, after the answer: a thin trio driver over the
sans-IO :class:`~p2p_infer.proto.optimistic.OptimisticCheck`.

The query itself ran hop by hop with every executor's signed commitment checked against
what it returned (``QueryDriver.exchange``). Only then is the check drawn and started in
the client's background nursery: ``result.check`` is a :class:`PendingCheck` the caller can
await for the report; a mismatch is logged, its evidence verified, applied to the client's
reputation table and written to its audit log. ``Client.__aexit__`` waits for checks still
running (bounded), so a check is never dropped silently.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..errors import ConsensusError
from ..ml.models import SplitModel
from ..proto.auditor import evidence_message
from ..proto.optimistic import OptimisticCheck, OptimisticEvidence, Penalise, ReExecute, StageRun
from ..proto.query import HopFailure, SendHop, new_request_id
from .query_driver import QueryDriver

if TYPE_CHECKING:
    from .client import Client

log = structlog.get_logger("p2p_infer.client")


class PendingCheck:
    """An optimistic result's check: ``await result.check`` returns its report (a dict)."""

    def __init__(self) -> None:
        self._finished = trio.Event()
        self.report: dict[str, Any] = {"pending": True}
        self.evidence: list[OptimisticEvidence] = []

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def finish(self, report: dict[str, Any], evidence: Sequence[OptimisticEvidence] = ()) -> None:
        if not self.done:
            self.report, self.evidence = report, list(evidence)
            self._finished.set()

    async def wait(self) -> dict[str, Any]:
        await self._finished.wait()
        return self.report

    def __await__(self) -> Generator[Any, None, dict[str, Any]]:
        return self.wait().__await__()


def stage_runs(evidence: Sequence[Any], route: Sequence[Any], mask: Any) -> list[StageRun]:
    """The machine's (input, output, commitment) per hop, with each hop's layers."""
    return [StageRun(hop.first, hop.last, hidden, mask, output, commitment)
            for hop, (hidden, output, commitment) in zip(route, evidence)]


def start_check(client: Client, model: SplitModel, runs: list[StageRun], rng: random.Random) -> PendingCheck:
    """Draw the check now (the answer is back) and run it in the background."""
    servers = client.servers(model)
    others = {i: [s.peer_id for s in servers if s.first <= r.first and r.last <= s.last] for i, r in enumerate(runs)}
    machine = OptimisticCheck(client.query_plan.optimistic, runs, others, rng)
    pending = PendingCheck()
    if client._nursery is None:
        raise AssertionError("an optimistic check needs the client's nursery")
    client._nursery.start_soon(_run, client, model, machine, pending)
    return pending


async def _run(client: Client, model: SplitModel, machine: OptimisticCheck, pending: PendingCheck) -> None:
    driver = QueryDriver(client, model)
    try:
        actions = machine.start()
        while actions:
            action, actions = actions[0], actions[1:]
            if isinstance(action, Penalise):
                _penalise(client, action.evidence)
            else:
                actions += await _re_execute(client, driver, machine, action)
        report = machine.report()
        if report["mismatch"]:
            log.warning("optimistic check: an answer already returned did not hold", stages=report["stages"])
        pending.finish(report, machine.evidence)
    except Exception as exc:  # a background task: report it, never take the client down
        log.exception("optimistic check failed")
        pending.finish({**machine.report(), "error": f"{type(exc).__name__}: {exc}"}, machine.evidence)
    finally:  # cancelled (the client closed): say so instead of leaving the waiter hanging
        pending.finish({**machine.report(), "cancelled": True}, machine.evidence)


async def _re_execute(client: Client, driver: QueryDriver, machine: OptimisticCheck, action: ReExecute) -> list[Any]:
    stage = machine.stages[action.stage]
    now = trio.current_time()
    send = SendHop(new_request_id(client._rng), action.peer_id, stage.first, stage.last, stage.hidden,
                   now + client.request_timeout, "check", False, stage.mask, new_request_id(client._rng))
    outcome = await driver.exchange(send, action.request)
    if isinstance(outcome, HopFailure):
        log.info("optimistic re-execution failed", peer=action.peer_id, layers=f"{stage.first}-{stage.last}", reason=outcome.reason)
        if outcome.faulty:
            client.reputation.record(action.peer_id, fault=True)
        return machine.on_failure(action.stage, action.peer_id)
    return machine.on_answer(action.stage, action.peer_id, outcome.output, outcome.evidence)


def _penalise(client: Client, evidence: OptimisticEvidence) -> None:
    """Verified evidence: the accused's reputation drops once for that task, it is logged,
    and it is gossiped so every peer's auditor checks it and scores the accused too."""
    accused = evidence.accused
    try:
        client.auditor.on_optimistic(evidence, reporter=client.identity.peer_id)
    except ConsensusError as exc:
        log.error("own optimistic evidence did not verify", accused=accused.executor, reason=exc.message)
        return
    log.warning("optimistic check caught a wrong result", accused=accused.executor, layers=f"{accused.first}-{accused.last}",
                witnesses=[c.executor for c, _ in evidence.witnesses], reputation=round(client.reputation.of(accused.executor), 4))
    client._publish(evidence_message(evidence))
