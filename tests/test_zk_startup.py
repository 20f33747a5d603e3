"""A peer serving a provable shard builds its ZK circuit at start-up in another process and
keeps answering meanwhile (issue 10: the first critical request built it inside the peer,
and pings timed out for 17.5 s)."""

import json
import statistics
import time

import pytest
import trio

from p2p_infer.config import default_cache_dir
from p2p_infer.net.framing import request
from p2p_infer.net.host import dial, open_stream, parse_peer_addr
from p2p_infer.proto.wire import FORWARD_PROTOCOL
from p2p_infer.testing.harness import Swarm

from .conftest import light_host

pytestmark = pytest.mark.slow


def _events(log_file) -> list[str]:
    events = []
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line).get("event", ""))
        except ValueError:
            continue
    return events


async def test_a_peer_building_a_circuit_answers_pings_within_100_ms(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(default_cache_dir() / "models")  # the trained digits model; no circuits
    with Swarm(tmp_path / "swarm", extra_env={"P2P_INFER_CACHE": str(cache), "P2P_INFER_BUILD_CIRCUITS": "1"}) as swarm:
        swarm.start_bootstrap()
        peer = swarm.start_peer("prover", ["digits-mlp:2-2"])
        rtts: list[float] = []
        async with light_host() as host:
            info = parse_peer_addr(peer.addr)
            await dial(host, info)
            stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
            building = "building ZK circuits (separate process)" in _events(peer.log_file)
            with trio.fail_after(300):
                while "ZK circuits ready" not in (events := _events(peer.log_file)):
                    assert "ZK circuit build failed; critical mode is refused for these shards" not in events
                    started = time.perf_counter()
                    assert (await request(stream, {"type": "ping"}, timeout=10))["type"] == "pong"
                    rtts.append((time.perf_counter() - started) * 1000)
                    await trio.sleep(0.05)
        assert building and len(rtts) >= 20, (building, len(rtts))  # the pings spanned a real build
        rtts.sort()
        print(f"pings during the build: {len(rtts)}, median {statistics.median(rtts):.1f} ms, max {rtts[-1]:.1f} ms")
        within = sum(r < 100 for r in rtts) / len(rtts)
        # every ping on an idle box; a shared 2-core box may stall any process now and then
        assert within >= 0.98 and statistics.median(rtts) < 20 and rtts[-1] < 1000, (within, rtts[-5:])
