"""Verification of a finished generation: every span re-executed by another provider in one
stateless prefill (forward protocol) and compared with the outputs the client used, row by
row, within ``proto.generation.TOLERANCE``. A disagreement is settled by a third provider:
whoever the majority contradicts is recorded as faulty (reputation) with its signed
commitments as evidence; a caught route peer is excluded and the generation is run again
(``node/generate.py``); no third provider means the call fails loudly (VerificationFailed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..errors import P2PInferError, VerificationFailed
from ..proto.generation import GenerationMachine, agree, rows

if TYPE_CHECKING:
    from .generate import Generation

log = structlog.get_logger("p2p_infer.generate")


async def verify_spans(gen: Generation, model: Any, machine: GenerationMachine) -> dict[str, Any]:
    started = time.perf_counter()
    spans: list[dict[str, Any]] = [{} for _ in machine.slots]
    async with trio.open_nursery() as nursery:
        for index, verifier in machine.verifiers():
            nursery.start_soon(_verify_span, gen, model, machine, index, verifier, spans)
    agreed = all(s.get("agreed") for s in spans)
    return {"agreed": agreed, "spans": spans, "verify_ms": (time.perf_counter() - started) * 1000,
            "tolerance": "|a-b| <= 1e-3 + 1e-3*|b| per element"}


async def _reexecute(gen: Generation, model: Any, machine: GenerationMachine, index: int, peer: str) -> Any:
    slot = machine.slots[index]
    return rows(await gen.reexecute(model.model_id, peer, slot.first, slot.last, slot.inputs))


async def _verify_span(gen: Generation, model: Any, machine: GenerationMachine, index: int, verifier: str | None,
                       spans: list[dict[str, Any]]) -> None:
    slot = machine.slots[index]
    tried: set[str] = set(slot.producers) | machine.excluded
    again = None
    while again is None:  # an unreachable verifier is replaced by another provider
        if verifier is None:
            raise VerificationFailed(f"no provider left to re-execute layers {slot.first}-{slot.last}")
        try:
            again = await _reexecute(gen, model, machine, index, verifier)
        except P2PInferError as exc:
            log.info("verifier failed", peer=verifier[:16], reason=exc.message)
            tried.add(verifier)
            verifier = machine.provider(slot.first, slot.last, tried)
    bad = machine.check_reexecution(index, to_wire_rows(again))
    record = {"first": slot.first, "last": slot.last, "verifier": verifier, "rows": len(slot.outputs)}
    if not bad:
        spans[index] = {**record, "agreed": True}
        return
    third = machine.provider(slot.first, slot.last, tried | {verifier})
    if third is None:
        raise VerificationFailed(f"layers {slot.first}-{slot.last}: {verifier[:16]}... disagrees with the route on {len(bad)} "
                                 f"of {len(slot.outputs)} tokens and no third provider can settle it")
    settle = await _reexecute(gen, model, machine, index, third)
    if not machine.check_reexecution(index, to_wire_rows(settle)):  # the route was right: the verifier lied
        gen.client.reputation.record(verifier, fault=True)
        gen.caught.append({"peer": verifier, "first": slot.first, "last": slot.last, "role": "verifier"})
        spans[index] = {**record, "agreed": True, "settled_by": third}
    elif agree(settle, again):  # two providers against the route's peer(s)
        liars = machine.blame(index, bad)
        for liar in liars:
            gen.client.reputation.record(liar, fault=True)
            evidence = [c for c in slot.commitments if c["peer"] == liar]
            gen.caught.append({"peer": liar, "first": slot.first, "last": slot.last, "role": "route",
                               "bad_tokens": len(bad), "signed_commitments": len(evidence)})
        gen.excluded |= liars
        log.warning("verification caught a lying span peer; regenerating without it", peers=[p[:16] for p in liars])
        spans[index] = {**record, "agreed": False, "settled_by": third, "liars": sorted(liars)}
    else:
        raise VerificationFailed(f"layers {slot.first}-{slot.last}: three providers disagree; cannot settle")


def to_wire_rows(array: Any) -> Any:
    from ..proto.generation import to_wire

    return to_wire(array)
