"""Fair compute scheduling: work is queued per remote peer and served round-robin, so one
client's flood cannot starve another (issue 10: with one global queue, 40 concurrent large
requests from one client pushed another's small ones from 6 ms to 660 ms).

Rules, in order:

* **admission** (synchronous, so forwarding can refuse before it says ``accepted``): a peer
  may have ``max_queued_per_peer`` jobs waiting, everyone together ``max_queued``; past
  either, :class:`~p2p_infer.errors.Overloaded`;
* **dispatch**: when a slot frees, peers with waiting jobs take turns (round-robin, oldest
  job of each peer first);
* **reserve**: the last free slot goes only to a peer with nothing running, so a newcomer
  never waits for a flooder's long jobs to finish. A lone busy client gets ``slots - 1``
  slots (all of them when ``slots`` is 1).

Reputation weighting is not done yet: every peer gets the same share.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..errors import Overloaded


class Job:
    """One admitted unit of compute: ``async with scheduler.run(job)`` waits for its turn."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.admitted = time.perf_counter()
        self.started = trio.Event()
        self.done = False

    @property
    def queue_ms(self) -> float:
        return (time.perf_counter() - self.admitted) * 1000


class FairScheduler:
    def __init__(self, slots: int, max_queued_per_peer: int, max_queued: int) -> None:
        self.slots = max(1, slots)
        self.max_queued_per_peer = max_queued_per_peer
        self.max_queued = max_queued
        self.waiting: OrderedDict[str, deque[Job]] = OrderedDict()  # peers in turn order
        self.running: Counter[str] = Counter()
        self.queued = 0

    # ---- statistics ----

    @property
    def busy(self) -> int:
        return sum(self.running.values())

    @property
    def in_flight(self) -> int:
        return self.busy + self.queued

    def load(self) -> float:
        return self.in_flight / self.slots

    # ---- admission and dispatch ----

    def admit(self, peer: str) -> Job:
        """Queue a job for ``peer`` or refuse it at once."""
        mine = len(self.waiting.get(peer, ()))
        if mine >= self.max_queued_per_peer:
            raise Overloaded(f"{mine} requests from this peer already queued (limit {self.max_queued_per_peer})")
        if self.queued >= self.max_queued:
            raise Overloaded(f"{self.queued} requests already queued")
        job = Job(peer)
        self.waiting.setdefault(peer, deque()).append(job)
        self.queued += 1
        self._dispatch()
        return job

    def _eligible(self, peer: str) -> bool:
        free = self.slots - self.busy
        return free > 1 or self.running[peer] == 0

    def _dispatch(self) -> None:
        while self.busy < self.slots and self.waiting:
            peer = next((p for p in self.waiting if self._eligible(p)), None)
            if peer is None:
                return  # the last slot is kept for a peer with nothing running
            jobs = self.waiting.pop(peer)
            job = jobs.popleft()
            if jobs:
                self.waiting[peer] = jobs  # back of the line: the others go first
            self.queued -= 1
            self.running[peer] += 1
            job.started.set()

    def _finish(self, job: Job) -> None:
        if job.done:
            return
        job.done = True
        if job.started.is_set():
            self.running[job.peer] -= 1
            if self.running[job.peer] <= 0:
                del self.running[job.peer]
        else:  # abandoned while waiting (cancelled): take it out of its queue
            jobs = self.waiting.get(job.peer)
            if jobs is not None and job in jobs:
                jobs.remove(job)
                self.queued -= 1
                if not jobs:
                    del self.waiting[job.peer]
        self._dispatch()

    @asynccontextmanager
    async def run(self, job: Job) -> AsyncIterator[float]:
        """Wait for ``job``'s turn, hold its slot while the body runs; yields the queue time (ms)."""
        try:
            await job.started.wait()
            yield job.queue_ms
        finally:
            self._finish(job)

    def release(self, job: Job) -> None:
        """Give up a job that will never run (its request failed before computing)."""
        self._finish(job)
