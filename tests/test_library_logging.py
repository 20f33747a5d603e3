"""Library mode logs through the standard logging module and prints nothing unless the
application configures logging; the CLI and peers keep structured lines on stderr.
(Using the client against a real swarm prints nothing: tests/test_sync_client.py.)"""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

USE_THE_LIBRARY = """
import p2p_infer
import structlog
from p2p_infer.ml.models import load_model
from p2p_infer.node.client import Client, resolve_plan
structlog.get_logger("p2p_infer.client").warning("a library warning", peer="x")
structlog.get_logger("p2p_infer.peer").info("an info line")
import libp2p, logging  # py-libp2p resets its logger at import; the client module silences it again
logging.getLogger("libp2p.kad_dht.peer_routing").warning("Failed to open stream to a departed peer")  # py-libp2p's own
load_model("digits-mlp").run_local([0.0] * 64)
resolve_plan(None, unverified=True)
"""


def python(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_library_prints_nothing_by_default(tmp_path):
    proc = python(USE_THE_LIBRARY, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_application_logging_config_shows_the_events(tmp_path):
    code = "import logging, sys\nlogging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s %(levelname)s %(message)s')\n"
    proc = python(code + USE_THE_LIBRARY, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "p2p_infer.client WARNING event='a library warning' peer='x'" in lines, lines
    assert "p2p_infer.peer INFO event='an info line'" in lines
    # levels filter as the application says
    quiet = python(code.replace("logging.INFO", "logging.WARNING") + USE_THE_LIBRARY, tmp_path)
    assert "an info line" not in quiet.stdout and "a library warning" in quiet.stdout


def test_an_application_structlog_setup_is_kept(tmp_path):
    code = """
        import structlog, sys
        structlog.configure(processors=[structlog.processors.JSONRenderer()], logger_factory=structlog.PrintLoggerFactory(sys.stdout))
        import p2p_infer
        structlog.get_logger("p2p_infer.client").info("mine")
    """
    proc = python(code, tmp_path)
    assert json.loads(proc.stdout) == {"event": "mine"}


@pytest.mark.slow
def test_peer_process_logs_structured_lines_on_stderr(tmp_path):
    ready = tmp_path / "b.ready"
    proc = subprocess.Popen([sys.executable, "-m", "p2p_infer.cli", "bootstrap", "--key", str(tmp_path / "b.key"),
                             "--ready-file", str(ready), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stdout.strip().startswith("/ip4/127.0.0.1/tcp/") and len(stdout.strip().splitlines()) == 1  # only the multiaddr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "peer ready" in events
