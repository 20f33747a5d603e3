"""Start a local swarm (a bootstrap peer and N peers, each its own OS process on loopback),
wait until it is discoverable, and stop every process it started, whatever happens.

Used by the tests, the demo, the benchmarks and ``simulations/``::

    with Swarm(workdir) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([["minilm-l6:1-3"], ["minilm-l6:4-5"]])
        swarm.wait_discoverable()
        print(swarm.cli("query", "hello", "--json"))
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import SwarmError

_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:  # last line of defence if a caller forgot stop()
    for proc in list(_LIVE):
        _kill_group(proc, signal.SIGKILL)


atexit.register(_kill_leftovers)


def trio_run_sync(fn: Callable[..., Any], *args: Any) -> Any:
    import trio

    return trio.run(fn, *args)


def _kill_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class PeerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    key_file: Path
    serve: list[str] = field(default_factory=list)
    info: dict[str, Any] | None = None
    argv: list[str] = field(default_factory=list)  # how it was started: restart() runs it again
    env: dict[str, str] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        assert self.info is not None, f"{self.name} is not ready"
        return str(self.info["peer_id"])

    @property
    def addr(self) -> str:
        assert self.info is not None, f"{self.name} is not ready"
        return str(self.info["addrs"][0])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class Swarm:
    def __init__(
        self,
        workdir: Path,
        *,
        record_ttl: float = 30.0,
        extra_env: dict[str, str] | None = None,
        python: str = sys.executable,
        place: Callable[[str], tuple[list[str], str]] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        # place(name) -> (argv prefix, listen multiaddr): run a process elsewhere, e.g. in a network
        # namespace on its own address (sim/netns.py); None: loopback, as before.
        self.place = place
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.record_ttl = record_ttl
        self.python = python
        # Start-up circuit builds off unless asked for: swarms share one cache, and shards such
        # as digits 1-3 need another SRS size than 1-2 / 3-3, which one ZK manifest cannot pin
        # (docs/zk.md); such peers refuse critical mode (not_provable) unless a test opts in.
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "P2P_INFER_BUILD_CIRCUITS": "0",
                    **(extra_env or {})}
        self.peers: dict[str, PeerProcess] = {}
        self.bootstrap: PeerProcess | None = None

    # ---- context management: every process stops, even on failure ----

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- starting ----

    def _spawn(self, name: str, command: str, args: list[str], env: dict[str, str] | None = None) -> PeerProcess:
        if name in self.peers:
            raise SwarmError(f"a process named {name} already exists")
        key = self.workdir / f"{name}.key"
        ready = self.workdir / f"{name}.ready"
        log = self.workdir / f"{name}.log"
        ready.unlink(missing_ok=True)
        prefix, listen = self.place(name) if self.place else ([], "")
        argv = [*prefix, self.python, "-m", "p2p_infer.cli", command, "--key", str(key), "--ready-file", str(ready),
                "--record-ttl", str(self.record_ttl), "--log-format", "json", *(["--listen", listen] if listen else []), *args]
        with open(log, "ab") as log_handle:
            proc = subprocess.Popen(argv, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, **(env or {})}, start_new_session=True, cwd=self.workdir)
        _LIVE.add(proc)
        peer = PeerProcess(name, proc, ready, log, key, argv=argv, env={**self.env, **(env or {})})
        self.peers[name] = peer
        return peer

    def restart(self, name: str, wait: bool = True, timeout: float = 120) -> PeerProcess:
        """Start a stopped process again as it was first started: same key (so the same peer
        id), arguments and environment; its log is appended to (churn in simulations)."""
        old = self.peers[name]
        if old.alive():
            raise SwarmError(f"{name} is still running; kill it first")
        _LIVE.discard(old.proc)
        old.ready_file.unlink(missing_ok=True)
        with open(old.log_file, "ab") as log_handle:
            proc = subprocess.Popen(old.argv, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=old.env, start_new_session=True, cwd=self.workdir)
        _LIVE.add(proc)
        peer = PeerProcess(name, proc, old.ready_file, old.log_file, old.key_file, serve=old.serve, argv=old.argv, env=old.env)
        self.peers[name] = peer
        if wait and old.info is not None:
            self.wait_ready([peer], timeout)
        return peer

    def start_tool(self, name: str, module: str, args: list[str]) -> PeerProcess:
        """Run ``python -m module args`` in its own process group, stopped with the swarm
        (light clients that drive a simulation's load); output goes to NAME.log."""
        if name in self.peers:
            raise SwarmError(f"a process named {name} already exists")
        log = self.workdir / f"{name}.log"
        argv = [*(self.place(name)[0] if self.place else []), self.python, "-m", module, *args]
        with open(log, "ab") as log_handle:
            proc = subprocess.Popen(argv, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True, cwd=self.workdir)
        _LIVE.add(proc)
        tool = PeerProcess(name, proc, self.workdir / f"{name}.ready", log, self.workdir / f"{name}.key", argv=argv, env=self.env)
        self.peers[name] = tool
        return tool

    def process_groups(self) -> set[int]:
        """The process group ids of everything this swarm started (each process leads its own)."""
        return {p.proc.pid for p in self.peers.values()}

    def start_bootstrap(self, name: str = "bootstrap", timeout: float = 60) -> PeerProcess:
        self.bootstrap = self._spawn(name, "bootstrap", [])
        self.wait_ready([self.bootstrap], timeout)
        return self.bootstrap

    def start_peer(self, name: str, serve: list[str], extra_args: list[str] | None = None,
                   env: dict[str, str] | None = None, wait: bool = True, timeout: float = 120) -> PeerProcess:
        if self.bootstrap is None:
            raise SwarmError("start the bootstrap peer first")
        args = ["--bootstrap", self.bootstrap.addr, *(a for s in serve for a in ("--serve", s)), *(extra_args or [])]
        peer = self._spawn(name, "peer", args, env)
        peer.serve = list(serve)
        if wait:
            self.wait_ready([peer], timeout)
        return peer

    def start_peers(self, serves: list[list[str]], prefix: str = "peer", timeout: float = 180,
                    extra_args: list[str] | None = None) -> list[PeerProcess]:
        """Start several peers at once and wait for all of them."""
        start = len([n for n in self.peers if n.startswith(prefix)])
        peers = [self.start_peer(f"{prefix}{start + i}", s, extra_args, wait=False) for i, s in enumerate(serves)]
        self.wait_ready(peers, timeout)
        return peers

    def wait_ready(self, peers: list[PeerProcess], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        pending = [p for p in peers if p.info is None]
        while pending:
            for p in list(pending):
                if p.ready_file.exists():
                    p.info = json.loads(p.ready_file.read_text())
                    pending.remove(p)
                elif not p.alive():
                    raise SwarmError(f"{p.name} exited with {p.proc.returncode} before it was ready:\n{p.log_tail()}")
            if pending and time.monotonic() > deadline:
                raise SwarmError(f"not ready after {timeout} s: {[p.name for p in pending]}\n{pending[0].log_tail()}")
            time.sleep(0.1)

    # ---- observing and using ----

    def cli(self, *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``p2p-infer <command> ...`` in its own process; ``peers`` and ``query`` join this swarm."""
        if self.bootstrap is None:
            raise SwarmError("no bootstrap peer")
        command, *rest = args
        network = ["--bootstrap", self.bootstrap.addr] if command in ("peers", "query") else []
        argv = [self.python, "-m", "p2p_infer.cli", command, *network, *rest]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})},
                                    cwd=self.workdir, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise SwarmError(f"{' '.join(args)} timed out after {timeout} s") from exc
        if check and result.returncode != 0:
            raise SwarmError(f"p2p-infer {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def audit(self, name: str, *args: str, log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``p2p-infer audit`` of NAME's audit log (or LOG, e.g. a tampered copy), checked
        against NAME's own peer id: the command never takes the signer from the log."""
        path = log or self.workdir / f"{name}.audit.log"
        return self.cli("audit", "--log", str(path), "--peer", self.peers[name].peer_id, *args, check=check)

    def list_peers(self) -> dict[str, dict[str, Any]]:
        out = self.cli("peers", "--json").stdout
        return {p["peer_id"]: p for p in json.loads(out)["peers"]}

    def wait_discoverable(self, peers: list[PeerProcess] | None = None, timeout: float = 90) -> dict[str, dict[str, Any]]:
        """Poll as a light client until every given peer's record is found and verified; return
        the listing (``peers --json``'s rows)."""
        expected = {p.peer_id for p in (peers if peers is not None else self.serving())}
        return self.wait_listing(lambda listed: expected <= set(listed), timeout,
                                 lambda listed: f"not discoverable after {timeout} s: {sorted(expected - set(listed))}")

    def wait_listing(self, done: Callable[[dict[str, dict[str, Any]]], bool], timeout: float,
                     failure: Callable[[dict[str, dict[str, Any]]], str]) -> dict[str, dict[str, Any]]:
        """Poll the listing until ``done(listing)``; SwarmError(``failure(last listing)``) after
        ``timeout`` s. Each poll is a fresh client (new key, join, refresh), as ``p2p-infer
        peers`` is, but run in this process where it can: a CLI process per poll spends most of
        its 3-4 s of CPU importing, which starved the peers it waited for."""
        if not self._can_list_here():
            return self._wait_listed_by_cli(done, timeout, failure)
        with ThreadPoolExecutor(1) as pool:  # trio.run in its own thread: callers may be inside a trio test
            found, listed = pool.submit(trio_run_sync, self._poll_here, done, timeout).result()
        if not found:
            raise SwarmError(failure(listed))
        return listed

    def _can_list_here(self) -> bool:
        """This process reads the overlay as the swarm's CLI would only on loopback (no netns
        placement) and with the same cache (the same model ids)."""
        return self.place is None and self.env.get("P2P_INFER_CACHE") == os.environ.get("P2P_INFER_CACHE")

    def _wait_listed_by_cli(self, done: Callable[[dict[str, dict[str, Any]]], bool], timeout: float,
                            failure: Callable[[dict[str, dict[str, Any]]], str]) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            listed = self.list_peers()
            if done(listed):
                return listed
            if time.monotonic() > deadline:
                raise SwarmError(failure(listed))
            time.sleep(1)

    async def _poll_here(self, done: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> tuple[bool, dict[str, dict[str, Any]]]:
        import trio

        from ..cli.listing import peer_rows
        from ..config import default_cache_dir
        from ..ml.models import known_manifests
        from ..net.host import quiet_libp2p_logging
        from ..node.client import Client

        assert self.bootstrap is not None
        quiet_libp2p_logging()
        names = {mid: m.name for mid, m in known_manifests(default_cache_dir()).items()}
        listed: dict[str, dict[str, Any]] = {}
        with trio.move_on_after(timeout):
            while True:
                async with Client([self.bootstrap.addr], trial=False) as client:
                    listed = {row["peer_id"]: row for row in peer_rows(client, names)}
                if done(listed):
                    return True, listed
                await trio.sleep(0.5)
        return False, listed

    def serving(self) -> list[PeerProcess]:
        return [p for p in self.peers.values() if p.serve and p.alive()]

    # ---- stopping ----

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        peer = self.peers[name]
        _kill_group(peer.proc, sig)
        peer.proc.wait(timeout=15)
        _LIVE.discard(peer.proc)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every process group, wait, then SIGKILL what is left."""
        procs = [p.proc for p in self.peers.values()]
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc, signal.SIGKILL)  # also reaps any child the peer left behind
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            _LIVE.discard(proc)
