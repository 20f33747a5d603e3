"""Trial tasks: a known answer from each untried provider before it gets live traffic. Sans-IO.

The driver makes each task (a random input, which a peer cannot tell from real traffic,
and the answer it computed on its own weights), sends what :meth:`Admission.start` asks,
and reports replies and failures. A wrong answer is a fault and keeps the peer out; a
failure to answer judges nothing (it may be tried again at a later query). Verdicts
outlive the query: one :class:`Admission` serves a client for its lifetime.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .consensus import outputs_agree
from .query import HopFailure, Record, SendHop, new_request_id
from .tensors import WireTensor


@dataclass(frozen=True)
class TrialTask:
    peer_id: str
    layer: int
    activation: WireTensor  # random input of the model's hidden shape
    expected: WireTensor  # the client's own output for ``layer`` on it
    mask: WireTensor | None = None


@dataclass(frozen=True)
class Admit:
    """``peer_id`` passed its trial: it may carry live traffic."""

    peer_id: str


@dataclass
class _Running:
    task: TrialTask
    deadline: float


@dataclass
class Admission:
    rng: random.Random
    timeout: float = 30.0
    passed: dict[str, bool] = field(default_factory=dict)  # peer -> passed its trial
    _running: dict[str, _Running] = field(default_factory=dict)

    def admitted(self, peer_id: str) -> bool:
        return self.passed.get(peer_id, False)

    def untried(self, providers: Iterable[tuple[str, int]]) -> dict[str, int]:
        """``(peer, first layer of a shard)`` pairs to the layer each untried peer is tried on."""
        return {peer: layer for peer, layer in providers if peer not in self.passed}

    def start(self, tasks: Sequence[TrialTask], now: float) -> list[SendHop]:
        sends = []
        for task in tasks:
            request_id = new_request_id(self.rng)
            self._running[request_id] = _Running(task, now + self.timeout)
            sends.append(SendHop(request_id, task.peer_id, task.layer, task.layer, task.activation, now + self.timeout,
                                 "trial", mask=task.mask))
        return sends

    def on_reply(self, request_id: str, output: WireTensor, now: float) -> list[Record | Admit]:
        running = self._running.pop(request_id, None)
        if running is None:
            return []
        peer, passed = running.task.peer_id, outputs_agree(output, running.task.expected)
        self.passed[peer] = passed
        return [Record(peer, fault=not passed), *([Admit(peer)] if passed else [])]

    def on_failure(self, request_id: str, failure: HopFailure, now: float) -> list[Any]:
        """It did not answer: not admitted, not judged."""
        self._running.pop(request_id, None)
        return []

    def poll(self, now: float) -> list[Any]:
        for request_id in [r for r, run in self._running.items() if run.deadline <= now]:
            self.on_failure(request_id, HopFailure.timed_out(self.timeout), now)
        return []

    @property
    def busy(self) -> bool:
        return bool(self._running)
