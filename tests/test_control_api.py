"""The peer's control API (``peer --api``): a real peer process, a real query through it,
then ``GET /status`` and ``GET /metrics`` (parsed with prometheus_client's parser) and
``p2p-infer status`` must all account for it."""

import json
import subprocess
import sys

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2p_infer.gateway.http import parse_bind
from p2p_infer.errors import ConfigError
from p2p_infer.net.framing import read_message, write_message
from p2p_infer.net.host import dial, open_stream, parse_peer_addr
from p2p_infer.proto.wire import FORWARD_PROTOCOL
from p2p_infer.testing.harness import Swarm

from .conftest import light_host

FORWARD = str(FORWARD_PROTOCOL)


def test_api_address_must_be_loopback_unless_public():
    assert parse_bind("127.0.0.1:8470").port == 8470
    assert parse_bind("[::1]:0").host == "::1"
    assert parse_bind("localhost:1").host == "localhost"
    for bad in ("0.0.0.0:8470", "192.0.2.7:80", "[::]:1"):
        with pytest.raises(ConfigError, match="not a loopback address.*--api-public"):
            parse_bind(bad)
        assert parse_bind(bad, allow_public=True).host in bad
    for malformed in ("8470", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "example.org:80"):
        with pytest.raises(ConfigError):
            parse_bind(malformed)


def test_peer_refuses_a_public_api_address_before_loading_anything(tmp_path):
    run = subprocess.run([sys.executable, "-m", "p2p_infer.cli", "peer", "--key", str(tmp_path / "k.key"), "--serve",
                          "minilm-l6:1-5", "--api", "0.0.0.0:8470"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2  # a usage error, refused before torch is imported
    assert "'0.0.0.0:8470' is not a loopback address" in run.stderr and run.stderr.startswith("error: ")
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "peer ready" not in run.stderr + run.stdout


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("api"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        swarm.start_peer("p0", ["minilm-l6:1-5"], extra_args=["--api", "127.0.0.1:0"], timeout=180)
        swarm.wait_discoverable(timeout=90)
        yield swarm


def api_url(swarm) -> str:
    url = swarm.peers["p0"].info["api"]
    assert url and url.startswith("http://127.0.0.1:")
    return url


async def bad_forward(addr: str) -> dict:
    """A forward request for layers the peer does not serve: answered with an error code."""
    async with light_host() as host:
        info = parse_peer_addr(addr)
        await dial(host, info)
        stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
        try:
            await write_message(stream, {"type": "forward", "model_id": "00" * 32, "first": 1, "last": 2,
                                         "hidden": {"dtype": "float32", "shape": [1, 1, 384], "data": b"\0" * 1536}})
            with trio.fail_after(30):
                return await read_message(stream)
        finally:
            await stream.close()


def samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.mark.slow
async def test_status_and_metrics_after_a_query(swarm):
    url = api_url(swarm)
    before = httpx.get(f"{url}/status", timeout=10).json()
    out = json.loads(swarm.cli("query", "--unverified", "--json", "the control API counts this").stdout)
    assert out["route"] and all(h["peer"] == swarm.peers["p0"].peer_id for h in out["route"])
    reply = await bad_forward(swarm.peers["p0"].addr)
    assert reply["type"] == "error"
    status = httpx.get(f"{url}/status", timeout=10).json()
    assert status["peer_id"] == swarm.peers["p0"].peer_id and status["version"]
    assert status["serving"] == [{"model": "minilm-l6", "model_id": out["model_id"], "first": 1, "last": 5}]
    assert status["addrs"] and status["uptime_s"] > 0 and status["connections"] >= 1
    forward = status["requests"]["by_protocol"][FORWARD]
    assert forward.get("ok", 0) >= (before["requests"]["by_protocol"].get(FORWARD, {}).get("ok", 0) + 1)
    assert forward.get(reply["code"], 0) >= 1 and status["requests"]["errors"] >= 1
    assert status["requests"]["served"] == sum(n for codes in status["requests"]["by_protocol"].values() for n in codes.values())
    assert status["forwards_served"] >= 1 and status["sessions_open"] == 0 and status["queue_depth"] == 0

    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.headers["content-type"].startswith("text/plain")
    found = samples(metrics.text)
    ok = [s for s in found["p2p_infer_requests"] if s.name == "p2p_infer_requests_total"
          and s.labels["protocol"] == FORWARD and s.labels["code"] == "ok"]
    assert {s.labels["type"] for s in ok} >= {"forward", "ping"}  # the query's hop, the client's round-trip probe
    assert sum(s.value for s in ok) == forward["ok"]
    refused = [s for s in found["p2p_infer_requests"] if s.labels.get("code") == reply["code"]]
    assert refused and refused[0].value >= 1
    count = [s for s in found["p2p_infer_request_seconds"] if s.name.endswith("_count") and s.labels["protocol"] == FORWARD]
    assert count and count[0].value >= forward["ok"] + forward[reply["code"]]
    received = [s for s in found["p2p_infer_received_bytes"] if s.labels["protocol"] == FORWARD]
    assert received and received[0].value >= 384 * 4 * 3  # at least one hidden state of a few tokens came in
    assert [s.value for s in found["p2p_infer_connections"]][0] >= 1
    assert [s.value for s in found["p2p_infer_sessions_open"]] == [0]


@pytest.mark.slow
def test_status_command_reads_the_api(swarm):
    url = api_url(swarm)
    addr = url.removeprefix("http://")
    raw = json.loads(swarm.cli("status", "--api", addr, "--json").stdout)
    assert raw["peer_id"] == swarm.peers["p0"].peer_id
    text = swarm.cli("status", "--api", addr).stdout
    assert raw["peer_id"] in text and "minilm-l6:1-5" in text and "requests" in text
    gone = swarm.cli("status", "--api", "127.0.0.1:9", check=False)
    assert gone.returncode == 1 and gone.stderr.startswith("error: no control API at 127.0.0.1:9") and "Traceback" not in gone.stderr
