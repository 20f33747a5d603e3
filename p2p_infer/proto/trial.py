"""Trial tasks: known-answer requests a peer cannot tell from live traffic. Sans-IO.

A trial is only worth something if the peer cannot recognise it, since a liar answers
trials honestly and lies otherwise. Issue 9 found them trivial to spot: always one layer,
eight tokens, no session, and all sent just before the first live request. Now
:meth:`Admission.plan` shapes every trial like the live request it could be:

* **ranges**: the range a route would give that peer (its shard, clipped to the layers the
  client does not run itself), not one layer;
* **tokens**: the live query's own token count, and an input the driver makes from a
  synthetic but model-shaped raw input (embedded, then run through the layers before the
  range), not Gaussian noise;
* **sessions**: a fresh non-empty session id, as every live query now carries;
* **timing**: a peer is tried before it gets live traffic only when the query cannot route
  without it; otherwise its first trial, and every later one (each admitted provider, with
  probability ``retrial`` per query), is sent at a moment drawn with the rng across the
  live query's expected duration, concurrently with it.

The driver builds each :class:`TrialSpec` into a :class:`TrialTask` (the input and the
answer its own weights give), sends what :meth:`Admission.start` asks, and reports replies
and failures. A wrong answer is a fault and keeps the peer out, also after it was
admitted; a failure to answer judges nothing. Verdicts outlive the query.

Left distinguishable (docs/consensus.md): in critical mode trials ask for no proof (every
live answer is proven, so dodging a trial gains nothing there), and a new client's first
request to a peer is a trial whenever the query needs that peer at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .consensus import outputs_agree
from .query import HopFailure, Record, SendHop, new_request_id
from .tensors import WireTensor

RETRIAL_RATE = 0.1  # chance per query that each admitted provider gets another trial (each costs the client the range's compute)
DEFAULT_SPREAD_S = 0.05  # before any query was timed: the window mixed-in trials are spread over
SPREAD_WEIGHT = 0.2  # EWMA weight of the latest query's duration


@dataclass(frozen=True)
class Provider:
    """One shard of one peer, as routing sees it."""

    peer_id: str
    first: int
    last: int


@dataclass(frozen=True)
class TrialSpec:
    """A trial the driver must build and send ``delay`` seconds after the query starts."""

    peer_id: str
    first: int
    last: int
    tokens: int  # the live query's sequence length (0 for models without one)
    session: str
    delay: float = 0.0
    gating: bool = False  # the query waits for it (it cannot route without this peer)


@dataclass(frozen=True)
class TrialTask:
    peer_id: str
    first: int
    last: int
    activation: WireTensor  # a model-shaped input for layer ``first``
    expected: WireTensor  # the client's own output for ``first..last`` on it
    mask: WireTensor | None = None
    session: str = ""


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
    retrial: float = RETRIAL_RATE
    passed: dict[str, bool] = field(default_factory=dict)  # peer -> passed its last trial
    spread: float = DEFAULT_SPREAD_S  # seconds: how long a live query takes, as last measured
    _running: dict[str, _Running] = field(default_factory=dict)

    def admitted(self, peer_id: str) -> bool:
        return self.passed.get(peer_id, False)

    def untried(self, providers: Iterable[tuple[str, int]]) -> dict[str, int]:
        """``(peer, first layer of a shard)`` pairs to the layer each untried peer would be tried on."""
        return {peer: layer for peer, layer in providers if peer not in self.passed}

    def plan(self, providers: Sequence[Provider], *, remote_first: int, n_layers: int, tokens: int,
             gate_untried: bool, whole_shards: bool = False) -> list[TrialSpec]:
        """This query's trials: every untried provider once (``gating`` if the query must wait
        for it), and each admitted provider with probability ``retrial``; at most one per peer."""
        specs: list[TrialSpec] = []
        candidates = list(providers)
        self.rng.shuffle(candidates)  # which shard of a peer, and the order sent, are the rng's
        for provider in candidates:
            span = _live_range(provider, remote_first, n_layers, whole_shards)
            if span is None or any(s.peer_id == provider.peer_id for s in specs):
                continue
            known = self.passed.get(provider.peer_id)
            if known is None:
                gating = gate_untried
            elif known and self.rng.random() < self.retrial:
                gating = False
            else:
                continue
            delay = 0.0 if gating else self.rng.uniform(0.0, self.spread)
            specs.append(TrialSpec(provider.peer_id, *span, tokens, new_request_id(self.rng), delay, gating))
        return specs

    def on_query_done(self, seconds: float) -> None:
        """A live query took ``seconds``: later trials are spread across that long."""
        self.spread = (1 - SPREAD_WEIGHT) * self.spread + SPREAD_WEIGHT * max(seconds, 0.0)

    def start(self, tasks: Sequence[TrialTask], now: float) -> list[SendHop]:
        sends = []
        for task in tasks:
            request_id = new_request_id(self.rng)
            self._running[request_id] = _Running(task, now + self.timeout)
            sends.append(SendHop(request_id, task.peer_id, task.first, task.last, task.activation, now + self.timeout,
                                 "trial", mask=task.mask, session=task.session))
        return sends

    def on_reply(self, request_id: str, output: WireTensor, now: float) -> list[Record | Admit]:
        running = self._running.pop(request_id, None)
        if running is None:
            return []
        peer, passed = running.task.peer_id, outputs_agree(output, running.task.expected)
        self.passed[peer] = passed  # a wrong answer un-admits a peer that had passed before
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


def _live_range(provider: Provider, remote_first: int, n_layers: int, whole_shards: bool) -> tuple[int, int] | None:
    """The layers a route would run on this shard: from where the client stops (or the shard
    starts) to the shard's end; whole shards only in critical mode (a circuit covers one)."""
    first, last = max(provider.first, remote_first), min(provider.last, n_layers - 1)
    if first > last or (whole_shards and (provider.first < remote_first or provider.last > n_layers - 1)):
        return None
    return first, last
