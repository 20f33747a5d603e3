"""``[network] mode = "netns"``: every process of a run in its own Linux network namespace, on
its own address, and the kernel shaping and cutting the links between them.

Layout: a bridge ``br<tag>`` in the root namespace holds 10.A.B.1/24 (so the runner itself,
``Swarm.wait_discoverable``, reaches the peers); each process gets a namespace
``p2psim-<pid>-<n>`` with a veth pair (``eth0`` inside, ``v<tag>n<n>`` on the bridge) and
10.A.B.(n+2). What a ``[[network.shape]]`` asks is applied to what the listed processes send:

* delay and jitter: an ``htb`` class per rule with a ``netem`` leaf (sch_netem);
* rate: the rule's ``htb`` class rate;
* loss: ``iptables -m statistic --mode random`` DROP in the sender's OUTPUT chain;

all in the kernel (no userspace proxy). A ``[[network.partition]]`` moves the group's bridge
ports to a second bridge ``bp<tag>``: the group still reaches itself, nobody else, until the
heal moves them back. Every namespace, link and bridge made is removed by :meth:`close`, and
at start the namespaces of runs whose process is gone are swept (a runner killed by SIGKILL).
A request this machine cannot honour is refused by name (:class:`NetworkLabUnavailable`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import structlog

from ..errors import NetworkLabUnavailable, SimulationError
from .scenario import NetworkSpec, ShapeSpec

log = structlog.get_logger("p2p_infer.sim.netns")
PREFIX = "p2psim-"


GSO_MAX_BYTES = 1500  # shaped interfaces segment at the MTU (see NetnsLab._shape)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:  # no iproute2 here, or a wedged command
        result = subprocess.CompletedProcess(list(argv), 127, "", str(exc))
    if check and result.returncode != 0:
        raise SimulationError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


@dataclass
class Capabilities:
    """What this machine can do, probed in a scratch namespace (nothing is left behind)."""

    missing: list[str] = field(default_factory=list)  # why namespaces cannot run at all
    netem: bool = False
    iptables: bool = False
    netem_error: str = ""

    @classmethod
    def probe(cls) -> Capabilities:
        caps = cls()
        if os.geteuid() != 0:
            caps.missing.append("root (network namespaces need CAP_NET_ADMIN)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                caps.missing.append(f"{tool} (iproute2)")
        if caps.missing:
            return caps
        scratch = f"{PREFIX}probe-{os.getpid()}"
        made = _run("ip", "netns", "add", scratch, check=False)
        if made.returncode != 0:
            caps.missing.append(f"ip netns add: {made.stderr.strip()}")
            return caps
        try:
            _run("ip", "netns", "exec", scratch, "ip", "link", "set", "lo", "up", check=False)
            netem = _run("ip", "netns", "exec", scratch, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
            caps.netem, caps.netem_error = netem.returncode == 0, netem.stderr.strip()
            if shutil.which("iptables"):
                ipt = _run("ip", "netns", "exec", scratch, "iptables", "-A", "OUTPUT", "-o", "lo", "-m", "statistic",
                           "--mode", "random", "--probability", "0.01", "-j", "DROP", check=False)
                caps.iptables = ipt.returncode == 0
        finally:
            _run("ip", "netns", "del", scratch, check=False)
        return caps

    def refuse(self, spec: NetworkSpec) -> None:
        """Raise naming everything ``spec`` needs and this machine lacks."""
        if self.missing:
            raise NetworkLabUnavailable("network.mode = \"netns\" needs " + "; ".join(self.missing))
        if any(s.delay_ms or s.jitter_ms for s in spec.shape) and not self.netem:
            raise NetworkLabUnavailable("network.shape delay_ms / jitter_ms need the kernel's sch_netem qdisc, which this "
                                        f"kernel lacks (tc qdisc add ... netem: {self.netem_error or 'failed'})")
        if any(s.loss for s in spec.shape) and not self.iptables:
            raise NetworkLabUnavailable("network.shape loss needs iptables with the statistic match (apt-get install iptables)")


def sweep_stale() -> list[str]:
    """Remove namespaces (and their bridges) of runs whose runner process no longer exists."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name[len(PREFIX):].split("-")
        if not name.startswith(PREFIX) or len(parts) != 2 or not parts[0].isdigit():
            continue
        if not os.path.exists(f"/proc/{parts[0]}"):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for pid in {n[len(PREFIX):].split("-")[0] for n in removed}:
        tag = _tag(int(pid))
        for bridge in (f"br{tag}", f"bp{tag}"):
            _run("ip", "link", "del", bridge, check=False)
    return removed


def _tag(pid: int) -> str:
    return f"{pid % 65536:04x}"


class NetnsLab:
    """The namespaces, links and rules of one run; a context manager that removes them all."""

    def __init__(self, spec: NetworkSpec, pid: int | None = None) -> None:
        self.spec = spec
        self.pid = os.getpid() if pid is None else pid
        self.tag = _tag(self.pid)
        self.bridge, self.cut_bridge = f"br{self.tag}", f"bp{self.tag}"
        self.subnet = f"10.{200 + self.pid % 50}.{(self.pid // 50) % 256}"
        self.index: dict[str, int] = {}  # process name -> n (address .n+2)
        self.made: list[str] = []  # namespaces, for close()
        self.links: list[str] = []  # root-side links and bridges, for close()
        self.cut: set[str] = set()

    def __enter__(self) -> NetnsLab:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        Capabilities.probe().refuse(self.spec)
        stale = sweep_stale()
        if stale:
            log.warning("removed namespaces of runs that are gone", namespaces=stale)
        for bridge in (self.bridge, self.cut_bridge):
            _run("ip", "link", "add", bridge, "type", "bridge")
            self.links.append(bridge)
            _run("ip", "link", "set", bridge, "up")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)

    def address(self, name: str) -> str:
        if name not in self.index:
            if len(self.index) >= 250:
                raise SimulationError("network.mode = \"netns\": at most 250 processes per run (one /24)")
            self.index[name] = len(self.index)
        return f"{self.subnet}.{self.index[name] + 2}"

    def namespace(self, name: str) -> str:
        self.address(name)
        return f"{PREFIX}{self.pid}-{self.index[name]}"

    def place(self, name: str) -> tuple[list[str], str]:
        """The argv prefix that runs a process inside ``name``'s namespace, and its listen address
        (the namespace is made, and its shaping applied, on first use; a restart reuses it)."""
        ns = self.namespace(name)
        if ns not in self.made:
            self._make(name, ns)
        return ["ip", "netns", "exec", ns], f"/ip4/{self.address(name)}/tcp/0"

    def _make(self, name: str, ns: str) -> None:
        port = f"v{self.tag}n{self.index[name]}"
        _run("ip", "netns", "add", ns)
        self.made.append(ns)
        _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.links.append(port)
        _run("ip", "link", "set", port, "master", self.bridge, "up")
        inside = ("ip", "netns", "exec", ns)
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
        _run(*inside, "ip", "link", "set", "eth0", "up")
        rules = [s for s in self.spec.shape if name in s.peers]
        if rules:
            self._shape(inside, rules)

    def _shape(self, inside: tuple[str, ...], rules: list[ShapeSpec]) -> None:
        # htb charges a packet when it dequeues it: a GSO super-packet (up to 64 kB, a whole
        # reply once the congestion window has grown) leaves at line speed and only the next one
        # waits, so a 25 kB reply every second crossed a "1 Mbit/s" link in 0 ms. MTU-sized
        # segments make the rate hold for every reply, not only on average.
        _run(*inside, "ip", "link", "set", "dev", "eth0", "gso_max_size", str(GSO_MAX_BYTES))
        tc = (*inside, "tc")
        _run(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "99", "r2q", "1000")
        _run(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:99", "htb", "rate", "10gbit")
        for j, rule in enumerate(rules):
            cls = f"1:{10 + j}"
            rate = f"{rule.rate_mbit}mbit" if rule.rate_mbit else "10gbit"
            _run(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", cls, "htb", "rate", rate)
            if rule.delay_ms:
                jitter = [f"{rule.jitter_ms}ms", "distribution", "normal"] if rule.jitter_ms else []
                _run(*tc, "qdisc", "add", "dev", "eth0", "parent", cls, "netem", "delay", f"{rule.delay_ms}ms", *jitter)
            dests = [f"{self.address(t)}/32" for t in rule.to] or ["0.0.0.0/0"]
            for dest in dests:
                _run(*tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", str(1 + j),
                     "u32", "match", "ip", "dst", dest, "flowid", cls)
                if rule.loss:
                    _run(*inside, "iptables", "-A", "OUTPUT", "-o", "eth0", "-d", dest, "-m", "statistic",
                         "--mode", "random", "--probability", f"{rule.loss:.6f}", "-j", "DROP")

    def partition(self, names: list[str]) -> None:
        for name in names:
            self.place(name)
            _run("ip", "link", "set", f"v{self.tag}n{self.index[name]}", "master", self.cut_bridge)
            self.cut.add(name)

    def heal(self, names: list[str]) -> None:
        for name in names:
            _run("ip", "link", "set", f"v{self.tag}n{self.index[name]}", "master", self.bridge)
            self.cut.discard(name)

    def close(self) -> None:
        """Remove every namespace (its eth0 goes with it), root-side link and bridge; never raises."""
        for ns in self.made:
            _run("ip", "netns", "del", ns, check=False)
        for link in reversed(self.links):
            _run("ip", "link", "del", link, check=False)
        self.made, self.links = [], []

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run still present (the tests and processes_left check it)."""
        ns = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines()
              if line.startswith(f"{PREFIX}{self.pid}-")]
        links = [line for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines()
                 if f"v{self.tag}n" in line or f"br{self.tag}" in line or f"bp{self.tag}" in line]
        return ns + links
