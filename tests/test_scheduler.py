"""The fair compute scheduler: per-peer queues served round-robin, a reserved slot, bounded queues."""

import pytest
import trio
import trio.testing

from p2p_infer.errors import Overloaded
from p2p_infer.node.scheduler import FairScheduler


async def test_a_flooder_cannot_starve_another_peer():
    sched = FairScheduler(slots=2, max_queued_per_peer=8, max_queued=64)
    order: list[str] = []
    gate = trio.Event()

    async def work(peer: str) -> None:
        async with sched.run(sched.admit(peer)):
            order.append(peer)
            await gate.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(work, "flood")
        await trio.testing.wait_all_tasks_blocked()
        assert sched.running == {"flood": 1}  # the last slot is kept for a peer with nothing running
        nursery.start_soon(work, "victim")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["flood", "victim"]  # the newcomer starts at once, ahead of 7 queued flood jobs
        gate.set()
    assert sched.in_flight == 0 and not sched.waiting


async def test_waiting_peers_take_turns():
    sched = FairScheduler(slots=1, max_queued_per_peer=8, max_queued=64)
    order: list[str] = []
    release = trio.Event()

    async def work(peer: str) -> None:
        async with sched.run(sched.admit(peer)):
            order.append(peer)
            if peer == "first":
                await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(work, "first")
        await trio.testing.wait_all_tasks_blocked()
        for peer in ["a", "a", "a", "b", "b", "c"]:
            nursery.start_soon(work, peer)
            await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert order == ["first", "a", "b", "c", "a", "b", "a"]


async def test_queues_are_bounded_per_peer_and_in_all():
    sched = FairScheduler(slots=1, max_queued_per_peer=2, max_queued=3)
    sched.admit("running")  # takes the slot
    sched.admit("a"), sched.admit("a")
    with pytest.raises(Overloaded, match="from this peer"):
        sched.admit("a")
    sched.admit("b")
    with pytest.raises(Overloaded, match="already queued"):
        sched.admit("c")


async def test_a_cancelled_waiter_leaves_no_trace():
    sched = FairScheduler(slots=1, max_queued_per_peer=2, max_queued=4)
    first = sched.admit("x")
    assert first.started.is_set()
    with trio.move_on_after(0.05):
        async with sched.run(sched.admit("y")):
            raise AssertionError("never runs: the slot is taken")
    assert sched.queued == 0 and "y" not in sched.waiting
    sched.release(first)
    assert sched.in_flight == 0
