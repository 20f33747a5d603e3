"""Property-based fuzzing of every protocol handler of a real peer process (forward,
committee, artifact) and of a client's forward-result handler (issue 10).

Every input must get a well-formed reply (an error map with a known code other than
``internal``, or a normal reply) or a closed stream, within a deadline; the peer must stay
healthy (a normal query succeeds during and after) and its memory bounded. CI runs
``P2P_INFER_FUZZ_EXAMPLES`` inputs per handler (2,000 by default); ``make fuzz`` runs
10,000 and writes the figures to ``P2P_INFER_FUZZ_REPORT``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings

from p2p_infer.errors import P2PInferError
from p2p_infer.ml.models import load_model
from p2p_infer.ml.tensors import activation_to_wire
from p2p_infer.net.framing import read_message
from p2p_infer.net.host import dial, full_addrs, open_stream, parse_peer_addr, quiet_libp2p_logging, running_host
from p2p_infer.node.client import Client
from p2p_infer.proto.forward import ForwardRequest
from p2p_infer.proto.wire import ARTIFACT_PROTOCOL, COMMITTEE_PROTOCOL, FORWARD_PROTOCOL, RESULT_PROTOCOL
from p2p_infer.testing.harness import Swarm
from p2p_infer.testing.population import committee_candidates, committee_client

from . import fuzz_inputs as fi
from .strangers import rss_mb

pytestmark = [pytest.mark.slow, pytest.mark.fuzz]
EXAMPLES = int(os.environ.get("P2P_INFER_FUZZ_EXAMPLES", "2000"))
REPLY_TIMEOUT = 15.0  # no reply nor close within this is a hang
HEALTH_EVERY = 250  # inputs between two normal queries


def _codes(cls: type) -> set[str]:
    return {cls.__dict__.get("code", "internal")} | {c for sub in cls.__subclasses__() for c in _codes(sub)}


KNOWN_CODES = _codes(P2PInferError) - {"internal"}  # every code of the error tree, a handler bug's aside
STATS: dict[str, dict] = {}


class Prober:
    """A trio loop in a thread with a light host (and an in-process client whose
    forward-result handler is fuzzed too); the sync hypothesis tests call into it."""

    def __init__(self, bootstrap: str, peer_addr: str) -> None:
        self.bootstrap, self.peer_addr = bootstrap, peer_addr
        self.ready = threading.Event()
        self.token: trio.lowlevel.TrioToken | None = None
        self.streams: dict[tuple[str, str], object] = {}
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._thread, daemon=True)
        self.thread.start()
        assert self.ready.wait(120) and self.failure is None, self.failure

    def _thread(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by the constructor or by call()
            self.failure = exc
            self.ready.set()

    async def _main(self) -> None:
        quiet_libp2p_logging()
        self.stop = trio.Event()
        # as the committee probes' client: a member refuses strangers before it decodes anything
        async with running_host(committee_client()) as host, Client([self.bootstrap], trial=False, unverified=True) as client:
            self.host, self.client_addr = host, full_addrs(client.host)[0]
            self.token = trio.lowlevel.current_trio_token()
            self.ready.set()
            await self.stop.wait()

    def call(self, fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(30)

    async def exchange(self, target: str, protocol: str, probe: fi.Probe) -> str:
        """Send one probe; return the reply's code (or type), "closed" or "hang"."""
        key = (target, protocol)
        info = parse_peer_addr(target)
        with trio.move_on_after(REPLY_TIMEOUT):
            if key not in self.streams:
                await dial(self.host, info)
                self.streams[key] = await open_stream(self.host, info.peer_id, protocol)
            stream = self.streams[key]
            try:
                await stream.write(probe.frame)
                if probe.close_after:
                    await stream.close()
                reply = await read_message(stream, timeout=REPLY_TIMEOUT)
            except (EOFError, P2PInferError, Exception) as exc:
                self.streams.pop(key, None)
                return "closed" if not isinstance(exc, trio.TooSlowError) else "hang"
            if probe.close_after or reply.get("code") in ("bad_frame", "frame_too_large", "overloaded"):
                self.streams.pop(key, None)  # the peer ends the stream after these
            return check_reply(reply)
        self.streams.pop(key, None)
        return "hang"

    async def healthy(self, peer_addr: str) -> None:
        info = parse_peer_addr(peer_addr)
        await dial(self.host, info)
        stream = await open_stream(self.host, info.peer_id, FORWARD_PROTOCOL)
        try:
            for message in ({"type": "ping"}, digits_forward()):
                with trio.fail_after(20):
                    from p2p_infer.net.framing import request

                    reply = await request(stream, message)
                assert reply["type"] in ("pong", "forward_result"), reply
        finally:
            await stream.close()


def check_reply(reply: dict) -> str:
    assert isinstance(reply, dict) and isinstance(reply.get("type"), str), reply
    if reply["type"] != "error":
        return reply["type"]
    assert isinstance(reply.get("message"), str) and reply.get("code") in KNOWN_CODES, reply
    return reply["code"]


def digits_forward() -> dict:
    model = load_model("digits-mlp")
    return ForwardRequest(model.model_id, 1, 3, *activation_to_wire(model.embed([0.5] * 64))).to_wire()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    env = {"P2P_INFER_REQUESTS_PER_SECOND_PER_PEER": "100000",  # let every input reach its handler
           "P2P_INFER_BUILD_CIRCUITS": "0"}
    with Swarm(tmp_path_factory.mktemp("fuzz"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        peer = swarm.start_peer("target", ["digits-mlp:1-3"], env=env)
        prober = Prober(swarm.bootstrap.addr, peer.addr)
        try:
            prober.call(prober.healthy, peer.addr)
            yield swarm, peer, prober
        finally:
            prober.close()
            report = os.environ.get("P2P_INFER_FUZZ_REPORT")
            if report:
                Path(report).write_text(json.dumps(STATS, indent=2, sort_keys=True))


def _strategy(name: str):
    model_id = load_model("digits-mlp").model_id
    return {
        "forward": (FORWARD_PROTOCOL, fi.probes(fi.forward_messages(model_id))),
        "committee": (COMMITTEE_PROTOCOL, fi.probes(fi.committee_messages(model_id, list(committee_candidates(model_id).to_wire())))),
        "artifact": (ARTIFACT_PROTOCOL, fi.probes(fi.artifact_messages())),
        "forward-result (client)": (RESULT_PROTOCOL, fi.probes(fi.result_messages())),
    }[name]


@pytest.mark.parametrize("handler", ["forward", "committee", "artifact", "forward-result (client)"])
def test_fuzz_handler(rig, handler):
    swarm, peer, prober = rig
    protocol, strategy = _strategy(handler)
    target = prober.client_addr if protocol == RESULT_PROTOCOL else peer.addr
    pid = os.getpid() if protocol == RESULT_PROTOCOL else peer.info["pid"]  # the client runs in this process
    stats = {"inputs": 0, "replies": Counter(), "categories": Counter(), "hangs": 0, "crashes": 0,
             "rss_mb_before": round(rss_mb(pid), 1)}
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(probe=strategy)
    def one(probe: fi.Probe) -> None:
        outcome = prober.call(prober.exchange, target, protocol, probe)
        stats["inputs"] += 1
        stats["replies"][outcome] += 1
        stats["categories"][probe.category] += 1
        stats["hangs"] += outcome == "hang"
        assert outcome != "hang", probe
        if stats["inputs"] % HEALTH_EVERY == 0:
            assert peer.alive(), peer.log_tail()
            prober.call(prober.healthy, peer.addr)

    try:
        one()
    finally:
        stats["crashes"] = int(not peer.alive())
        stats["rss_mb_after"] = round(rss_mb(pid), 1) if peer.alive() else None
        stats["rss_of"] = "test process (client)" if protocol == RESULT_PROTOCOL else "peer process"
        stats["seconds"] = round(time.monotonic() - started, 1)
        STATS[handler] = {**stats, "replies": dict(stats["replies"]), "categories": dict(stats["categories"])}
    assert peer.alive(), peer.log_tail()
    prober.call(prober.healthy, peer.addr)  # a normal query after the fuzzing
    assert stats["rss_mb_after"] - stats["rss_mb_before"] < 150, stats  # bounded memory
    log = peer.log_file.read_text(errors="replace")
    assert '"handler failed"' not in log and '"stream handler crashed"' not in log  # no input reached a bug
