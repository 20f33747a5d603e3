"""The stream pool over two real hosts in one process: a request cancelled by its deadline
while its reply is still on the way must not leave that reply for the next request on the
same pooled stream (the churn scenario read a ticket reply as an execute's answer)."""

from __future__ import annotations

import trio

from p2p_infer.identity import Identity
from p2p_infer.net.host import add_handler, full_addrs, running_host
from p2p_infer.net.streams import StreamPool, sync_lookup
from p2p_infer.errors import PeerTimedOut

PROTOCOL = "/p2p-infer/test-echo/1.0.0"


async def echo(message: dict) -> dict:
    await trio.sleep(message.get("delay", 0))
    return {"type": "echo", "n": message["n"]}


async def test_a_request_cut_by_its_deadline_leaves_no_reply_for_the_next():
    async with running_host(Identity.generate()) as server, running_host(Identity.generate()) as client:
        add_handler(server, PROTOCOL, echo)
        server_id = server.get_id().to_base58()
        pool = StreamPool(client, sync_lookup(lambda _peer: full_addrs(server)))
        assert (await pool.request(server_id, PROTOCOL, {"type": "echo", "n": 0}, timeout=5))["n"] == 0  # the stream is pooled
        replies: list[int] = []

        async def slow() -> None:
            try:
                await pool.request(server_id, PROTOCOL, {"type": "echo", "n": 1, "delay": 0.3}, timeout=0.1)
            except PeerTimedOut:
                replies.append(-1)

        async def next_one() -> None:
            await trio.sleep(0.01)  # queued behind the slow one on the same slot
            replies.append((await pool.request(server_id, PROTOCOL, {"type": "echo", "n": 2}, timeout=5))["n"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            nursery.start_soon(next_one)
        assert replies == [-1, 2]  # not 1: the late reply to the cut request
        await trio.sleep(0.4)  # the late reply arrives on the abandoned stream, read by nobody
        assert (await pool.request(server_id, PROTOCOL, {"type": "echo", "n": 3}, timeout=5))["n"] == 3
