import os
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TESTS = Path(__file__).parent


def _interrupted(_signum, _frame):
    raise KeyboardInterrupt("SIGTERM")


def pytest_configure(config):
    """A SIGTERM (CI cancelling the job, `timeout`) ends the run as Ctrl-C does, in the main
    process and in every xdist worker: fixtures tear down and the harness's atexit hook kills
    what is left, where the default action ended the process and left every peer running."""
    signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture(scope="session", autouse=True)
def model_cache():
    """Train/cache the digits model once, before any peer process races to do it."""
    from p2p_infer.ml.models import known_manifests

    return known_manifests()


@asynccontextmanager
async def light_host(identity=None):
    """A bare libp2p host in the test process (a fresh identity unless given), for poking
    peers with raw streams."""
    from p2p_infer.net.host import quiet_libp2p_logging, running_host
    from p2p_infer.identity import Identity

    quiet_libp2p_logging()
    async with running_host(identity or Identity.generate()) as host:
        yield host


def python() -> str:
    return sys.executable
