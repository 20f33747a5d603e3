"""Network faults (issue 13): peers in network namespaces on their own addresses, links
slowed, made lossy and cut by the kernel, everything removed afterwards.

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2). Delay and
jitter need the kernel's sch_netem: where it is absent the run is refused by name, and that
refusal is what is tested here (the CI VM's kernel has CONFIG_NET_SCH_NETEM unset).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p_infer.errors import NetworkLabUnavailable, PeerUnreachable
from p2p_infer.sim.netns import PREFIX, Capabilities, NetnsLab, _tag
from p2p_infer.sim.runner import simulate
from p2p_infer.sim.scenario import NetworkSpec, PartitionSpec, ShapeSpec, load_scenario

from .test_simulations import simulate_until_first_peer

SIMS = Path(__file__).parent.parent / "simulations"
CAPS = Capabilities.probe()
needs_netns = pytest.mark.skipif(bool(CAPS.missing), reason="network namespaces unavailable here: " + "; ".join(CAPS.missing))
# loss is iptables' statistic match (.ci/run installs iptables); without it a lossy run is refused by name
needs_loss = pytest.mark.skipif(not CAPS.iptables, reason="iptables with the statistic match is unavailable here (network.shape loss)")

SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 9000)); s.listen()
while True:
    c, _ = s.accept(); n = 0
    while (b := c.recv(65536)):
        n += len(b)
    c.sendall(str(n).encode()); c.close()
"""
SEND = """
import socket, sys, time
t = time.perf_counter(); s = socket.create_connection((sys.argv[1], 9000), timeout=float(sys.argv[3]))
s.sendall(b"x" * int(sys.argv[2])); s.shutdown(socket.SHUT_WR); got = s.recv(100)
print(int(got), round(time.perf_counter() - t, 3))
"""


def send(lab: NetnsLab, src: str, dst: str, nbytes: int, timeout: float = 10.0) -> tuple[int, float] | None:
    """nbytes from src's namespace to dst's server over TCP: (bytes received, seconds), None if cut."""
    out = subprocess.run([*lab.place(src)[0], sys.executable, "-c", SEND, lab.address(dst), str(nbytes), str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 20)
    if out.returncode != 0:
        return None
    got, seconds = out.stdout.split()
    return int(got), float(seconds)


def our_namespaces(pid: int) -> list[str]:
    return [line for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith(f"{PREFIX}{pid}-")]


def our_links(pid: int) -> list[str]:
    tag = _tag(pid)
    return [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
            if f"v{tag}n" in line or f"br{tag}" in line or f"bp{tag}" in line]


@needs_netns
@needs_loss
def test_own_addresses_rate_loss_and_a_partition_in_the_kernel_and_nothing_left_even_on_failure():
    spec = NetworkSpec(mode="netns", shape=[ShapeSpec(peers=["peer1"], to=["peer0"], rate_mbit=1.0),
                                            ShapeSpec(peers=["peer2"], loss=0.999)])
    servers = []
    with pytest.raises(RuntimeError, match="a failure inside the run"):
        with NetnsLab(spec) as lab:
            for name in ("peer0", "peer1", "peer2", "peer3"):
                prefix, listen = lab.place(name)
                assert listen == f"/ip4/{lab.address(name)}/tcp/0"
            for name in ("peer0", "peer3"):
                servers.append(subprocess.Popen([*lab.place(name)[0], sys.executable, "-c", SERVER]))
            time.sleep(1.0)
            try:
                fast = send(lab, "peer1", "peer3", 250_000)  # peer1's other links are not shaped
                slow = send(lab, "peer1", "peer0", 250_000)  # 2 Mbit over a 1 Mbit/s link: ~2 s
                assert fast and slow and fast[0] == slow[0] == 250_000
                assert slow[1] > 1.5 > fast[1] * 3, (fast, slow)
                assert send(lab, "peer2", "peer0", 1000, timeout=3) is None  # 99.9% of what peer2 sends is dropped
                lab.partition(["peer0", "peer1"])
                assert send(lab, "peer3", "peer0", 1000, timeout=3) is None  # cut off from the rest
                assert send(lab, "peer1", "peer0", 1000, timeout=5) is not None  # the group still reaches itself
                lab.heal(["peer0", "peer1"])
                assert send(lab, "peer3", "peer0", 1000, timeout=5) is not None
            finally:
                for proc in servers:
                    proc.kill()
                    proc.wait()
            assert our_namespaces(os.getpid()) and our_links(os.getpid())
            raise RuntimeError("a failure inside the run")
    assert our_namespaces(os.getpid()) == [] and our_links(os.getpid()) == []
    assert lab.leftovers() == []


@needs_netns
@pytest.mark.skipif(CAPS.iptables, reason="iptables is here: the lossy tests run instead")
def test_loss_without_iptables_is_refused_by_name():
    spec = NetworkSpec(mode="netns", shape=[ShapeSpec(peers=["peer0"], loss=0.1)])
    with pytest.raises(NetworkLabUnavailable, match="iptables"):
        NetnsLab(spec).open()
    assert our_namespaces(os.getpid()) == []


@needs_netns
def test_delay_is_applied_with_netem_or_refused_by_name_without_it():
    spec = NetworkSpec(mode="netns", shape=[ShapeSpec(peers=["peer0"], delay_ms=100.0)])
    if not CAPS.netem:
        with pytest.raises(NetworkLabUnavailable, match="sch_netem"):
            NetnsLab(spec).open()
        assert our_namespaces(os.getpid()) == []
        return
    with NetnsLab(spec) as lab:  # only where the kernel has sch_netem (not the CI VM)
        server = subprocess.Popen([*lab.place("peer1")[0], sys.executable, "-c", SERVER])
        try:
            time.sleep(1.0)
            delayed = send(lab, "peer0", "peer1", 10)
            assert delayed and delayed[1] > 0.2  # connect, send, reply: at least two delayed trips
        finally:
            server.kill()
            server.wait()
    assert our_namespaces(os.getpid()) == []


REPLIER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 9000)); s.listen()
c, _ = s.accept()
while (b := c.recv(10)):
    c.sendall(b"y" * 25000)
"""
ASKER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9000)); out = []
for i in range(6):
    t = time.time(); s.sendall(b"x"); n = 0
    while n < 25000: n += len(s.recv(65536))
    out.append(time.time() - t); time.sleep(0.5)
print(" ".join(str(x) for x in out))
"""


@needs_netns
def test_a_rate_holds_for_every_reply_on_a_long_lived_connection():
    """Found by the netem scenario: htb charges a GSO super-packet (a whole reply, once the
    congestion window has grown) only after sending it, so 25 kB replies on one connection
    crossed a 1 Mbit/s link in 0 ms after the first two. The lab segments shaped links at the MTU."""
    spec = NetworkSpec(mode="netns", shape=[ShapeSpec(peers=["peer0"], to=["client0"], rate_mbit=1.0)])
    with NetnsLab(spec) as lab:
        lab.place("client0")
        server = subprocess.Popen([*lab.place("peer0")[0], sys.executable, "-c", REPLIER])
        try:
            time.sleep(1.0)
            out = subprocess.run([*lab.place("client0")[0], sys.executable, "-c", ASKER, lab.address("peer0")],
                                 capture_output=True, text=True, timeout=60)
        finally:
            server.kill()
            server.wait()
    seconds = [float(x) for x in out.stdout.split()]
    assert len(seconds) == 6 and min(seconds) > 0.15, seconds  # 200 kbit at 1 Mbit/s: 0.2 s, every time


ECHO_PEER = """
import sys, trio
from p2p_infer.identity import Identity
from p2p_infer.net.host import add_handler, running_host

async def main():
    async def echo(message):
        return {"type": "echo", "n": message.get("n")}
    async with running_host(Identity.generate(), sys.argv[1]) as host:
        add_handler(host, "/test/echo/1", echo)
        print(str(host.get_addrs()[0]), flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


@needs_netns
def test_after_a_partition_heals_the_next_request_does_not_wait_for_tcp_backoff():
    """The ~25 s waits after the heal (issue 13): a TCP connection that carried data through a cut
    sits in the kernel's retransmission backoff (0.2 s doubled per try), so every request on it
    waited for the next retry, up to as long as the cut lasted. The pool closes a connection it
    sees stalled (``host.tcp_stalled``) when a request times out, and the next request dials anew."""
    import trio

    from p2p_infer.identity import Identity
    from p2p_infer.net.host import running_host
    from p2p_infer.net.streams import StreamPool, sync_lookup

    with NetnsLab(NetworkSpec(mode="netns")) as lab:
        prefix, listen = lab.place("peer0")
        server = subprocess.Popen([*prefix, sys.executable, "-c", ECHO_PEER, listen], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        try:
            addr = server.stdout.readline().strip()  # type: ignore[union-attr]
            peer_id = addr.rsplit("/p2p/", 1)[1]
            unreachable: list[str] = []

            async def scenario() -> tuple[float, bool]:
                async with running_host(Identity.generate(), f"/ip4/{lab.subnet}.1/tcp/0") as host:
                    pool = StreamPool(host, sync_lookup(lambda _p: [addr]), on_unreachable=unreachable.append)
                    assert (await pool.request(peer_id, "/test/echo/1", {"type": "echo", "n": 1}, timeout=5))["n"] == 1
                    lab.partition(["peer0"])
                    for n in range(3):  # requests into the cut: each times out; the stalled connection is closed
                        with pytest.raises(PeerUnreachable):
                            await pool.request(peer_id, "/test/echo/1", {"type": "echo", "n": n}, timeout=3)
                    await trio.sleep(6)
                    lab.heal(["peer0"])
                    started = trio.current_time()
                    reply = await pool.request(peer_id, "/test/echo/1", {"type": "echo", "n": 9}, timeout=8)
                    return trio.current_time() - started, reply["n"] == 9

            waited, ok = trio.run(scenario)
        finally:
            server.kill()
            server.wait()
    assert ok and waited < 2.0, waited  # without the close: the connection's next retransmission, seconds later
    assert peer_id in unreachable  # the client drops the peer's held committee ticket on this


def test_a_network_scenario_is_checked_before_it_runs(tmp_path):
    from p2p_infer.errors import ScenarioError

    base = 'name="x"\nengine="processes"\npeers=3\n'
    bad = {
        base + '[network]\nmode="netns"\n[[network.shape]]\npeers=["peer7"]\nloss=0.1\n': "beyond peers",
        base + '[network]\nmode="netns"\n[[network.shape]]\npeers=["node1"]\n': "unknown process name",
        base + '[network]\n[[network.partition]]\npeers=["peer1"]\n': "need network.mode",
        base + '[network]\nmode="netns"\n[[network.partition]]\npeers=["peer1"]\nstart_s=5.0\nheal_s=2.0\n': "start_s < heal_s",
        base + '[network]\nmode="netns"\n[[network.shape]]\npeers=["peer1"]\nlos=0.1\n': "unknown key",
        'name="x"\nengine="des"\npeers=3\n[network]\nmode="netns"\n': "engine = \"processes\"",
    }
    for text, named in bad.items():
        path = tmp_path / "s.toml"
        path.write_text(text)
        with pytest.raises(ScenarioError, match=named):
            load_scenario(path)
    sc = load_scenario(SIMS / "netem.toml")
    assert sc.network.mode == "netns" and sc.network.partition == [PartitionSpec(["peer7", "peer8"], 30.0, 55.0)]


@needs_netns
@needs_loss
@pytest.mark.slow
@pytest.mark.simulation
def test_the_netem_scenario_shows_a_slow_link_and_a_partition_healing(tmp_path):
    """simulations/netem.toml (~4 min). What must happen, and the bounds, from its layout and the
    protocol's timers:

    * slow links that must be used: stage A's only providers are peer0..peer2, so its committee
      is all three and its first quorum (2 of 3) needs peer0's or peer1's answer, a ~25 kB
      activation over a 1 Mbit/s link with 5% loss: >= 0.2 s, against milliseconds unshaped;
      so every stage A hop has a shaped peer in its quorum and stage A's median round trip is
      over 0.2 s and over stage B's by 0.15 s (CPU load slows both stages; the link adds to A);
    * the partition: peer7/peer8 serve only stage B (six providers, four left when they are
      cut), so no answered route passes through them while they are cut off; a member found
      unreachable loses its held ticket (the client asks it again on each query) and its
      stalled connection is closed (the next request dials afresh, py-libp2p's negative dial
      cache lifted), so after the heal the first ticket request sent after it succeeds, and
      from then on each stage B committee holds one of them with probability
      1 - C(4,3)/C(6,3) = 0.8: one of the first 6 queries sent after the heal has one of them
      agreeing (fails with probability < 0.2^5: the first query's ask may be one in flight at
      the heal), and it ends trusted (R >= 0.5).
    """
    report = simulate(SIMS / "netem.toml", tmp_path, progress=False)  # raises InvariantBroken on a broken invariant
    assert report["wrong_accepted"] == 0 and report["processes_left"] == 0 and report["netns_left"] == []
    (shape,), (part,) = report["network"]["shape"], report["network"]["partition"]
    answered = report["queries_answered"]
    assert shape["stages_through"] >= answered - part["during"]["sent"] and shape["stages_through"] == shape["stages_others"], shape
    assert shape["stage_p50_through_ms"] > max(200.0, shape["stage_p50_others_ms"] + 150.0), shape  # 24.6 kB at 1 Mbit/s: 0.2 s
    assert part["during"]["sent"] > 0 and part["during"]["routes_through_group"] == 0  # nobody reached the cut-off peers
    rejoin = part["agree_after_heal"]
    assert rejoin is not None and rejoin["query_after_heal"] <= 6, part  # and they were back after the heal
    assert any(part["reputation"]["end"][m] >= 0.5 for m in rejoin["members"]), part["reputation"]
    assert part["after"]["answered"] == part["after"]["sent"] > 0
    assert [e["kind"] for e in report["churn_events"]] == ["partition", "heal"]
    assert "partition of peer7/peer8" in (tmp_path / "report.md").read_text()
    assert our_namespaces(os.getpid()) == []


@needs_netns
@needs_loss
@pytest.mark.slow
@pytest.mark.simulation
def test_ctrl_c_removes_every_namespace_and_link(tmp_path):
    out = tmp_path / "out"
    proc = simulate_until_first_peer(SIMS / "netem.toml", out)
    try:
        assert len(our_namespaces(proc.pid)) >= 2 and our_links(proc.pid)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert our_namespaces(proc.pid) == [] and our_links(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        from p2p_infer.sim.netns import sweep_stale

        from .test_simulations import processes_mentioning

        for pid in processes_mentioning(str(out)):  # never leave a peer or a namespace behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
        sweep_stale()


class StalledConnection:
    """A yamux connection whose write lock is held by a write that never completes."""

    def __init__(self) -> None:
        import trio

        self.write_lock = trio.Lock()
        self.finalized: list[bool] = []

    async def _write_frame(self, data: bytes) -> None:
        async with self.write_lock:
            pass

    async def _finalize_stream(self, stream: object, *, fully_closed: bool) -> None:
        self.finalized.append(fully_closed)


async def test_a_stream_reset_stuck_behind_a_stalled_write_gives_up_inside_a_shield():
    """The queries a loaded CI run lost (issue 13): py-libp2p's failed new_stream resets the
    stream in a shielded scope, waiting for a write lock a stalled write holds; bounded now."""
    import trio
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    from p2p_infer.net.host import RESET_BOUND_S, _bound_yamux_reset

    _bound_yamux_reset()
    conn = StalledConnection()
    stream = YamuxStream(7, conn, True)  # type: ignore[arg-type]

    async def stalled_write() -> None:
        async with conn.write_lock:
            await trio.sleep_forever()

    done = trio.Event()

    async def cleanup() -> None:
        with trio.CancelScope(shield=True):  # as basic_host.new_stream's cleanup
            await stream.reset()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stalled_write)
        await trio.sleep(0.1)
        nursery.start_soon(cleanup)
        with trio.move_on_after(RESET_BOUND_S * 2 + 1):
            await done.wait()
        finished = done.is_set()
        nursery.cancel_scope.cancel()  # ends the stalled write, so an unbounded reset would end too
    assert finished, "the reset waited for the stalled write"
    assert stream.closed and conn.finalized == [True]
