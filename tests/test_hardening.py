"""Peers refuse what they cannot honour, with one clear line (issue: hardening)."""

import subprocess
import sys

import multiaddr
import pytest

from p2p_infer.testing.harness import Swarm


@pytest.mark.slow
def test_second_listener_on_a_port_fails_with_a_clear_message(tmp_path):
    with Swarm(tmp_path) as swarm:
        boot = swarm.start_bootstrap()
        port = multiaddr.Multiaddr(boot.addr).value_for_protocol("tcp")
        proc = subprocess.run(
            [sys.executable, "-m", "p2p_infer.cli", "peer", "--key", str(tmp_path / "second.key"),
             "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--log-format", "json"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 1
        assert f"error: cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already in use" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert swarm.cli("peers", "--json").returncode == 0  # the first listener still serves
