"""testing: swarms of real processes (``harness``), misbehaving peers (``adversaries``),
and populations of providers without a network (``population``).

``TEST_FAULTS`` lives here, free of torch, so the CLI can list ``--test-fault`` choices
without importing the adversaries, as does :func:`link_delay` (``--test-delay-ms``)."""

from __future__ import annotations

import random
from typing import Any

import trio

from ..net.framing import Handler

TEST_FAULTS = ("wrong-output", "no-reveal", "late-commit", "copy", "equivocate", "lie-after-trial", "claims-fast", "consistent-liar",
               "tee-forged", "tee-stale", "tee-measurement",  # the tee-* ones: bad attestations (verify/tee.py)
               "wrong-generation", "slow-tickets", "wrong-shape")


def link_delay(handle: Handler, delay_ms: float, jitter_ms: float, rng: random.Random | None = None) -> Handler:
    """TESTING AID (``--test-delay-ms``, ``--test-jitter-ms``): hold every reply (error
    replies too) ``delay_ms`` plus up to ``jitter_ms`` (uniform), as if it crossed a link of
    that round trip: for a kernel without netem. The wait costs no CPU."""
    if delay_ms <= 0 and jitter_ms <= 0:
        return handle
    draw = rng or random.Random()

    async def delayed(message: dict[str, Any]) -> dict[str, Any]:
        try:
            return await handle(message)
        finally:
            await trio.sleep((delay_ms + draw.uniform(0.0, jitter_ms)) / 1000)

    return delayed
