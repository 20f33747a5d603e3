"""Every ordinary mistake through the real CLI process: exactly one ``error:`` line on stderr,
the exit code (2 usage or configuration, 1 runtime, 130 interrupted), never a traceback.
Ctrl-C during a query and during a peer's start-up exits 130 within 2 s; a stopped peer
withdraws its record; CLI clients leave no ghost entries (one swarm for the module)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p_infer.testing.harness import Swarm

NOWHERE = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"  # nothing listens on port 1
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "P2P_INFER_BUILD_CIRCUITS": "0"}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2p_infer.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL)


def one_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == "", (result.stdout, result.stderr[-2000:])
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.key"
    assert cli("id", "--key", str(good), cwd=tmp_path).returncode == 0
    open_key = tmp_path / "open.key"
    open_key.write_bytes(good.read_bytes())
    open_key.chmod(0o644)
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(b"not a key")
    corrupt.chmod(0o600)
    return {"good": good, "open": open_key, "corrupt": corrupt}


MISTAKES = [  # argv, exit code, what the one line must say
    (["peer", "--serve", "minilm-l6:4-9", "--bootstrap", NOWHERE], 2, ["minilm-l6 has layers 0-5"]),
    (["peer", "--serve", "nosuch:1-2", "--bootstrap", NOWHERE], 2, ["unknown model 'nosuch'"]),
    (["peer", "--listen", "garbage", "--bootstrap", NOWHERE], 2, ["'garbage' is not a TCP multiaddr"]),
    (["peer", "--config", "missing.toml"], 2, ["missing.toml does not exist", "config init"]),
    (["peer", "--config", "typo.toml"], 2, ["unknown setting 'lisen'", "did you mean 'listen'"]),
    (["peer", "--config", "bad.toml"], 2, ["bad.toml is not valid TOML"]),
    (["peer", "--config", "badserve.toml"], 2, ["minilm-l6 has layers 0-5"]),
    (["query", "--model", "digits-mlp", "--bootstrap", NOWHERE, "test:999"], 2, ["N in 0-449"]),
    (["query", "--model", "digits-mlp", "--bootstrap", NOWHERE, "1,2,3"], 2, ["64", "got 3"]),
    (["query", "--bootstrap", NOWHERE, ""], 2, ["input text is empty"]),
    (["query", "--bootstrap", NOWHERE, "--local-layers", "0", "hi"], 2, ["--local-layers"]),
    (["query", "--bootstrap", NOWHERE, "--local-layers", "6", "hi"], 2, ["at most 5"]),
    (["query", "--bootstrap", NOWHERE, "--committee", "0", "hi"], 2, ["below the minimum committee size k=3"]),
    (["query", "--bootstrap", NOWHERE, "--committee", "2", "hi"], 2, ["below the minimum committee size k=3"]),
    (["query", "--bootstrap", NOWHERE, "--forwarding", "hi"], 2, ["--unverified"]),
    (["query", "--bootstrap", NOWHERE, "--listen", "garbage", "hi"], 2, ["--listen 'garbage'"]),
    (["query", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "hi"], 2, ["no /p2p/PEER_ID part"]),
    (["query", "hi"], 2, ["no bootstrap peer configured"]),
    (["query", "--bootstrap", NOWHERE, "--save-proofs", "p.bin", "hi"], 2, ["--mode critical"]),
    (["verify", "no-such.cert"], 2, ["does not exist"]),
    (["frobnicate"], 2, ["No such command"]),
    (["query", "--bogus", "hi"], 2, ["No such option"]),
]


@pytest.mark.parametrize("argv,code,needles", MISTAKES, ids=[" ".join(m[0])[:60] for m in MISTAKES])
def test_a_mistake_is_one_error_line(tmp_path: Path, argv: list[str], code: int, needles: list[str]) -> None:
    (tmp_path / "typo.toml").write_text('lisen = "/ip4/127.0.0.1/tcp/0"\n')
    (tmp_path / "bad.toml").write_text("listen = \n")
    (tmp_path / "badserve.toml").write_text('serve = ["minilm-l6:4-9"]\nbootstrap = ["%s"]\n' % NOWHERE)
    one_error(cli(*argv, cwd=tmp_path), code, *needles)


def test_a_bad_environment_value_is_named(tmp_path: Path) -> None:
    result = cli("peer", "--bootstrap", NOWHERE, cwd=tmp_path, env={"P2P_INFER_MAX_CONCURRENT": "abc"})
    one_error(result, 2, "P2P_INFER_MAX_CONCURRENT", "'abc'")


@pytest.mark.parametrize("which,needle", [("open", "readable by others"), ("corrupt", "not an Ed25519")])
def test_a_bad_key_file_is_refused_by_every_command(tmp_path: Path, keys: dict[str, Path], which: str, needle: str) -> None:
    for argv in (["id"], ["peer", "--bootstrap", NOWHERE], ["query", "--bootstrap", NOWHERE, "hi"]):
        one_error(cli(*argv, "--key", str(keys[which]), cwd=tmp_path), 1, needle)


def test_mistakes_are_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """In one process: after each refusal torch is still not imported (and nothing was joined)."""
    argvs = [m[0] for m in MISTAKES if "verify" not in m[0]]
    script = ("import sys, json; from p2p_infer.cli import main\n"
              f"for argv in json.loads({json.dumps(json.dumps(argvs))}):\n"
              "    rc = main(argv)\n"
              "    assert rc == 2 and 'torch' not in sys.modules and 'libp2p' not in sys.modules, (argv, rc)\n")
    (tmp_path / "typo.toml").write_text('lisen = 1\n')
    (tmp_path / "bad.toml").write_text("listen = \n")
    (tmp_path / "badserve.toml").write_text('serve = ["minilm-l6:4-9"]\n')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_bytes(b"x")
    (tmp_path / "bad.key").chmod(0o600)
    result = cli("--debug", "id", "--key", "bad.key", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "error: key file bad.key" in result.stderr


def test_version_and_help(tmp_path: Path) -> None:
    from p2p_infer import __version__

    assert cli("--version", cwd=tmp_path).stdout.strip() == f"p2p-infer {__version__}"
    assert "Usage: p2p-infer query" in cli("query", "--help", cwd=tmp_path).stdout


# ---- with a swarm: interrupts, the empty bootstrap list, withdrawal, ghosts ----


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory):
    with Swarm(tmp_path_factory.mktemp("cli-swarm"), record_ttl=60) as s:
        s.start_bootstrap()
        s.start_peers([["digits-mlp:1-3"]])
        s.wait_discoverable()
        yield s


def _interrupt_after(proc: subprocess.Popen[str], marker: str, timeout: float = 120) -> tuple[float, str]:
    """Read stderr until a line with ``marker``, send SIGINT, return (seconds to exit, stderr)."""
    assert proc.stderr is not None
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=30)
            return time.monotonic() - sent, "".join(seen) + rest
    proc.kill()
    raise AssertionError(f"never saw {marker!r}:\n{''.join(seen)[-3000:]}")


def test_ctrl_c_during_a_query_exits_130_at_once(tmp_path: Path) -> None:
    """The query is stuck joining a bootstrap peer that accepts the connection and never answers."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()
        addr = f"/ip4/127.0.0.1/tcp/{stalled.getsockname()[1]}/p2p/{NOWHERE.rsplit('/', 1)[1]}"
        # SIGINT back to its default in the child: started from a background job (`pytest &`)
        # it inherits SIG_IGN, and then Python (rightly) never turns Ctrl-C into KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, "-m", "p2p_infer.cli", "query", "--bootstrap", addr, "--unverified", "hello"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            stalled.settimeout(120)
            conn, _ = stalled.accept()  # the client is inside the query, dialling
            time.sleep(0.3)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            elapsed = time.monotonic() - sent
            conn.close()
        finally:
            proc.kill()
    assert proc.returncode == 130 and elapsed < 2.0, (proc.returncode, elapsed, err[-2000:])
    assert "Traceback" not in err and [ln for ln in err.splitlines() if ln.startswith("error:")] == ["error: interrupted"]


def test_ctrl_c_during_peer_start_up_exits_130_and_publishes_nothing(swarm: Swarm, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "p2p_infer.cli", "peer", "--bootstrap", swarm.bootstrap.addr, "--key",
                             str(tmp_path / "k"), "--serve", "minilm-l6:1-5", "--ready-file", str(ready), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    try:
        elapsed, err = _interrupt_after(proc, '"phase": "load and verify weights"')
    finally:
        proc.kill()
    assert proc.returncode == 130 and elapsed < 2.0, (proc.returncode, elapsed, err[-2000:])
    assert "Traceback" not in err and not ready.exists()
    assert "peer ready" not in err and "record published" not in err and "throughput probe" not in err


def test_an_empty_bootstrap_list_is_said_loudly_and_ready_says_alone(tmp_path: Path) -> None:
    """Also: the heartbeat line, and the record withdrawn on SIGTERM."""
    (tmp_path / "bootstrap").mkdir()
    (tmp_path / "bootstrap" / "peers.txt").write_text("# no peers yet\n")
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "p2p_infer.cli", "peer", "--key", str(tmp_path / "k"), "--ready-file",
                             str(ready), "--log-format", "json", "--heartbeat-interval", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "not ready"
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "warning: no bootstrap peer configured (bootstrap/peers.txt lists none)" in err
    ready_line = next(json.loads(ln) for ln in err.splitlines() if '"peer ready"' in ln)
    assert ready_line["alone"] is True
    beat = next(json.loads(ln) for ln in err.splitlines() if '"heartbeat"' in ln)
    assert beat["served"] == 0 and beat["errors"] == 0 and "connections" in beat and "load" in beat
    assert '"record withdrawn"' in err and proc.returncode == 0


def test_query_uses_its_listen_address_and_key(swarm: Swarm, tmp_path: Path, keys: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("query", "--bootstrap", swarm.bootstrap.addr, "--model", "digits-mlp", "--unverified",
                     "--listen", f"/ip4/127.0.0.1/tcp/{port}", "test:1", cwd=tmp_path)
        one_error(result, 1, f"cannot listen on /ip4/127.0.0.1/tcp/{port}")
    one_error(cli("query", "--bootstrap", swarm.bootstrap.addr, "--key", str(keys["open"]), "test:1", cwd=tmp_path), 1,
              "readable by others")


def test_a_stopped_peer_is_not_listed_and_cli_clients_leave_no_ghosts(swarm: Swarm) -> None:
    for _ in range(2):  # earlier CLI clients must not appear to later ones
        swarm.cli("query", "--model", "digits-mlp", "--unverified", "--json", "test:2")
    leaving = swarm.start_peer("leaving", ["digits-mlp:1-3"])
    assert leaving.peer_id in swarm.wait_discoverable([leaving])
    swarm.kill("leaving", signal.SIGINT)  # a clean stop: the record is withdrawn
    assert leaving.proc.returncode == 0
    time.sleep(2.5)  # the withdrawal record itself lives 2 s
    listing = swarm.cli("peers", "--json")
    peers = {p["peer_id"]: p for p in json.loads(listing.stdout)["peers"]}
    assert leaving.peer_id not in peers, peers.get(leaving.peer_id)
    assert set(peers) == {swarm.bootstrap.peer_id, swarm.peers["peer0"].peer_id}
    assert "no record found" not in listing.stderr, listing.stderr[-2000:]
