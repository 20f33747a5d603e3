import msgpack
import pytest
import trio
import trio.testing

from p2p_infer.errors import FrameError, FrameTooLarge, ProtocolViolation, RemoteError
from p2p_infer.net.framing import (
    decode_payload,
    encode_frame,
    read_message,
    request,
    Timeouts,
    serve_stream,
    write_message,
)
from p2p_infer.config import Limits
from p2p_infer.net.limits import Guard
from p2p_infer.proto.wire import protocol_id


class TrioStream:
    """read/write/close over a trio in-memory stream, like a libp2p stream."""

    def __init__(self, stream):
        self.s = stream

    async def read(self, n=None):
        return await self.s.receive_some(n)

    async def write(self, data):
        await self.s.send_all(data)

    async def close(self):
        await self.s.aclose()


async def echo(message):
    if message["type"] == "boom":
        raise RuntimeError("handler bug")
    if message["type"] != "echo":
        raise ProtocolViolation(f"unknown message type {message['type']!r}")
    return {"type": "echo", "value": message.get("value")}


async def served(max_frame=1024, timeout=5.0):
    a, b = trio.testing.memory_stream_pair()
    client, server = TrioStream(a), TrioStream(b)
    return client, server, max_frame, timeout


def test_protocol_ids_are_versioned():
    assert protocol_id("forward") == "/p2p-infer/forward/1.0.0"


def test_encode_decode_round_trip():
    frame = encode_frame({"type": "x", "data": b"\x00\x01"})
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_payload(frame[4:]) == {"type": "x", "data": b"\x00\x01"}


def test_oversized_message_is_refused_at_the_writer():
    with pytest.raises(FrameTooLarge):
        encode_frame({"type": "x", "data": b"a" * 2048}, max_frame=1024)


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"no": "type"}), msgpack.packb({"type": 5})])
def test_bad_payloads(payload):
    with pytest.raises((FrameError, ProtocolViolation)):
        decode_payload(payload)


async def test_requests_and_errors_on_one_stream():
    client, server, max_frame, timeout = await served()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server, echo, protocol="t", max_frame=max_frame, timeouts=Timeouts(timeout, timeout)))
        assert (await request(client, {"type": "echo", "value": 1}))["value"] == 1
        with pytest.raises(RemoteError, match="unknown message type") as info:
            await request(client, {"type": "nope"})
        assert info.value.code == "bad_request"
        with pytest.raises(RemoteError, match="handler bug") as info:
            await request(client, {"type": "boom"})
        assert info.value.code == "internal"
        # the stream still serves after both errors
        assert (await request(client, {"type": "echo", "value": 2}))["value"] == 2
        await client.close()


async def test_malformed_msgpack_gets_an_error_reply_and_the_handler_returns():
    client, server, max_frame, timeout = await served()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server, echo, protocol="t", max_frame=max_frame, timeouts=Timeouts(timeout, timeout)))
        await client.write((3).to_bytes(4, "big") + b"\xc1\xc1\xc1")
        reply = await read_message(client)
        assert reply["type"] == "error" and reply["code"] == "bad_frame"


async def test_oversized_frame_is_refused_before_reading_it():
    client, server, max_frame, timeout = await served(max_frame=1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server, echo, protocol="t", max_frame=max_frame, timeouts=Timeouts(timeout, timeout)))
        await client.write((10_000_000).to_bytes(4, "big"))
        reply = await read_message(client)
        assert reply["code"] == "frame_too_large"


async def test_truncated_frame_ends_the_stream_cleanly():
    client, server, max_frame, timeout = await served()
    done = trio.Event()

    async def run():
        await serve_stream(server, echo, protocol="t", max_frame=max_frame, timeouts=Timeouts(timeout, timeout))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.write((100).to_bytes(4, "big") + b"\x81\xa4type")  # 100 announced, 6 sent
        await client.s.send_stream.aclose()
        with trio.fail_after(5):
            await done.wait()


async def test_silent_peer_times_out():
    client, server, max_frame, _ = await served()
    done = trio.Event()

    async def run():
        await serve_stream(server, echo, protocol="t", max_frame=max_frame, timeouts=Timeouts(0.2, 0.2))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.write(b"\x00\x00")  # half a header, then nothing
        with trio.fail_after(5):
            await done.wait()


async def test_reader_raises_frame_error_on_truncation():
    a, b = trio.testing.memory_stream_pair()
    client, server = TrioStream(a), TrioStream(b)
    await client.write((10).to_bytes(4, "big") + b"abc")
    await client.s.send_stream.aclose()
    with pytest.raises(FrameError, match="inside a frame"):
        await read_message(server)


async def test_write_then_read():
    a, b = trio.testing.memory_stream_pair()
    client, server = TrioStream(a), TrioStream(b)
    await write_message(client, {"type": "x", "n": 3})
    assert await read_message(server) == {"type": "x", "n": 3}


def test_spec_vector():
    """protocols/framing.md pins these bytes."""
    assert encode_frame({"type": "ping"}).hex(" ") == "00 00 00 0b 81 a4 74 79 70 65 a4 70 69 6e 67"


async def test_a_frame_over_the_peers_byte_budget_is_refused_before_its_payload():
    """The length is reserved against the budget first; over it, ``overloaded`` at once."""
    client, server, _, _ = await served()
    guard = Guard(Limits(max_request_bytes_per_peer=1000))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server, echo, protocol="t", max_frame=4096, guard=guard, remote="p"))
        await client.write((2000).to_bytes(4, "big"))  # announced, never sent
        with trio.fail_after(2):
            reply = await read_message(client)
        assert reply["code"] == "overloaded" and "request bytes" in reply["message"]
    assert guard.stats() == {"streams": 0, "request_bytes": 0, "peers": 0}


async def test_budget_is_held_while_a_frame_is_read_and_given_back_after_the_reply():
    client, server, _, _ = await served()
    guard = Guard(Limits(max_request_bytes_per_peer=1000))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server, echo, protocol="t", max_frame=4096, guard=guard, remote="p"))
        frame = encode_frame({"type": "echo", "value": b"x" * 500})
        await client.write(frame[:100])
        await trio.testing.wait_all_tasks_blocked()
        assert guard.request_bytes["p"] == len(frame) - 4
        await client.write(frame[100:])
        assert (await read_message(client))["value"] == b"x" * 500
        assert guard.request_bytes["p"] == 0
        for _ in range(3):  # the budget is reusable: nothing leaks per request
            assert (await request(client, {"type": "echo", "value": 1}))["value"] == 1
        await client.close()


async def test_streams_over_the_per_peer_limit_are_refused():
    guard = Guard(Limits(max_streams_per_peer=2))
    pairs = [await served() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for client, server, _, _ in pairs[:2]:
            nursery.start_soon(lambda server=server: serve_stream(server, echo, protocol="t", guard=guard, remote="p"))
        await trio.testing.wait_all_tasks_blocked()
        client, server, _, _ = pairs[2]
        await serve_stream(server, echo, protocol="t", guard=guard, remote="p")
        assert (await read_message(client))["code"] == "overloaded"
        guard.open_stream("q")  # another peer is not affected
        nursery.cancel_scope.cancel()


async def test_idle_stream_is_closed_but_a_slow_frame_gets_frame_timeout():
    client, server, _, _ = await served()
    with trio.fail_after(3):
        await serve_stream(server, echo, protocol="t", timeouts=Timeouts(idle=0.2, frame=5))  # idle: returns
    client, server, _, _ = await served()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server, echo, protocol="t", timeouts=Timeouts(idle=5, frame=0.2)))
        await client.write((100).to_bytes(4, "big") + b"\x81")
        with trio.fail_after(3):
            reply = await read_message(client)
        assert reply["code"] == "bad_frame" and "not received within" in reply["message"]


async def test_a_stream_that_ends_inside_the_length_prefix_gets_bad_frame():
    client, server, _, _ = await served()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server, echo, protocol="t"))
        await client.write(b"\x00")
        await client.s.send_stream.aclose()
        with trio.fail_after(3):
            assert (await read_message(client))["code"] == "bad_frame"


async def test_a_peer_over_its_byte_rate_is_made_to_wait(autojump_clock):
    guard = Guard(Limits(read_bytes_per_second_per_peer=1000))
    start = trio.current_time()
    await guard.pace("p", 500)  # within the second's burst: no wait
    assert trio.current_time() == start
    await guard.pace("p", 2500)  # 2,000 bytes over: two seconds
    assert trio.current_time() - start == pytest.approx(2.0, abs=0.1)
    await guard.pace("q", 900)  # another peer has its own budget
    assert trio.current_time() - start == pytest.approx(2.0, abs=0.1)
