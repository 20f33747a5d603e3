"""The client's side of committee mode: one committee per remaining stage, re-runs on no
quorum, verdicts and evidence."""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

import structlog

from ..ml.models import Activation, SplitModel
from ..ml.tensors import decode_tensor, encode_tensor
from ..net.framing import Message
from ..proto.auditor import evidence_message
from ..proto.consensus import (
    Certificate,
    Commit,
    ConsensusError,
    Evidence,
    NoQuorum,
    StageCertificate,
    StageDecision,
    StageRound,
    StageTask,
    output_hash,
    request_hash,
)
from ..clock import now_ms
from .results import HopReport
from ..proto.wire import COMMITTEE_PROTOCOL, VERDICTS
from .committee import activation_hash, run_stage_round

log = structlog.get_logger("p2p_infer.client")



async def run_committees(client: Any, model: SplitModel, act: Activation) -> tuple[Activation, list[HopReport], list[dict[str, Any]], bytes]:
    """Every remaining stage on a committee; the certificate chains them. The stage
    verdicts are gossiped once, when the query ends (success or not)."""
    assert client.committee is not None
    try:
        return await run_stages(client, model, act)
    finally:
        if client._verdicts:
            client._publish({"type": VERDICTS, "client": client.identity.peer_id, "stages": client._verdicts})
            client._verdicts = []


async def run_stages(client: Any, model: SplitModel, act: Activation) -> tuple[Activation, list[HopReport], list[dict[str, Any]], bytes]:
    nonce = os.urandom(32)
    first_input = activation_hash(encode_tensor(act.hidden), None if act.mask is None else encode_tensor(act.mask))
    req_hash = request_hash(model.model_id, first_input, nonce)
    stages: list[StageCertificate] = []
    reports: list[dict[str, Any]] = []
    hops: list[Any] = []
    pos = client.local_layers
    while pos < len(model.layers):
        segment = (await client._plan_or_refresh(model, pos, ()))[0]
        started = time.perf_counter()
        decision, attempts = await decide_stage(client, model, len(stages), segment.first, segment.last, act, req_hash)
        act = Activation(decode_tensor(decision.output, field="output"), act.mask)
        stages.append(decision.certificate)
        reports.append({"stage": len(reports), "first": segment.first, "last": segment.last, "attempts": attempts,
                        "verdicts": decision.verdicts})
        hops.append(HopReport(",".join(m for m, v in decision.verdicts.items() if v == "agree"), segment.first, segment.last,
                              round_trip_ms=(time.perf_counter() - started) * 1000))
        pos = segment.last + 1
    mask_hash = b"" if act.mask is None else output_hash(encode_tensor(act.mask))
    cert = Certificate(model.model_id, nonce, first_input, mask_hash, stages)
    return act, hops, reports, cert.encode()


async def decide_stage(client: Any, model: SplitModel, stage: int, first: int, last: int, act: Activation, req_hash: bytes) -> tuple[StageDecision, int]:
    """Run the stage's committee; on no quorum re-run with a fresh committee, bounded."""
    assert client.directory is not None and client.committee is not None
    hidden, mask = encode_tensor(act.hidden), None if act.mask is None else encode_tensor(act.mask)
    excluded: set[str] = set()
    failures: list[str] = []
    for attempt in range(client.max_reruns + 1):
        candidates = [s.peer_id for s in client.servers(model) if s.first <= first and last <= s.last and s.peer_id not in excluded]
        task = StageTask(req_hash, stage, attempt, model.model_id, first, last, activation_hash(hidden, mask),
                         client.committee, now_ms() + int(client.commit_timeout * 1000))
        try:
            rnd = await run_stage_round(partial(committee_request, client), task, sorted(set(candidates)), hidden, mask,
                                        reveal_timeout=client.reveal_timeout, on_direct_commit=partial(on_direct_commit, client))
        except NoQuorum as exc:
            failures.append(exc.message)
            break  # too few candidates: a re-run cannot do better
        try:
            decision = rnd.decide()
        except NoQuorum as exc:
            failures.append(exc.message)
            judge(client, rnd, {m: rnd.faults.get(m, "no-quorum") for m in rnd.members})
            excluded.update(m for m in rnd.members if m in rnd.faults)
            log.warning("no quorum, re-running the stage with a fresh committee", stage=stage, attempt=attempt, reason=exc.message)
            continue
        judge(client, rnd, decision.verdicts, decision)
        return decision, attempt + 1
    raise NoQuorum(f"{model.name} stage {stage} (layers {first}-{last}) failed after {len(failures)} attempt(s): " + " | ".join(failures))


def judge(client: Any, rnd: StageRound, verdicts: dict[str, str], decision: StageDecision | None = None) -> None:
    """Apply reputation for one task and tell the network what was seen (off the critical path)."""
    task_id = rnd.task.task_id
    for member, verdict in verdicts.items():
        client.reputation.record_task(member, task_id, fault=verdict not in ("agree", "no-quorum"))
    client._verdicts.append({"task": task_id, "stage": rnd.task.stage, "verdicts": verdicts})  # gossiped once per query
    for member, verdict in verdicts.items():
        evidence = None
        if verdict == "wrong-output" and decision is not None:
            reveal, output = rnd.reveals[member]
            evidence = Evidence("wrong-output", member, [rnd.commits[member]], reveal, output, decision.certificate)
        elif verdict == "bad-reveal" and member in rnd.bad_reveals and not rnd.bad_reveals[member].opens(rnd.commits[member]):
            evidence = Evidence("bad-reveal", member, [rnd.commits[member]], rnd.bad_reveals[member])
        if evidence is not None:
            try:
                client.auditor.on_evidence(evidence, reporter=client.identity.peer_id)
            except ConsensusError as exc:  # never publish what we could not check ourselves
                log.error("own evidence did not verify", member=member, reason=exc.message)
                continue
            client._publish(evidence_message(evidence))


def on_direct_commit(client: Any, commit: Commit) -> None:
    for evidence in client.auditor.on_commit(commit):
        client._publish(evidence_message(evidence))


async def committee_request(client: Any, peer_id: str, message: Message, timeout: float) -> Message:
    assert client.pool is not None
    return await client.pool.request(peer_id, COMMITTEE_PROTOCOL, message, timeout=timeout)
