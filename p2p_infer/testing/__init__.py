"""testing: swarms of real processes (``harness``), misbehaving peers (``adversaries``),
and populations of providers without a network (``population``).

``TEST_FAULTS`` lives here, free of torch, so the CLI can list ``--test-fault`` choices
without importing the adversaries."""

TEST_FAULTS = ("wrong-output", "no-reveal", "late-commit", "copy", "equivocate", "lie-after-trial", "claims-fast", "consistent-liar",
               "tee-forged", "tee-stale", "tee-measurement",  # the tee-* ones: bad attestations (verify/tee.py)
               "wrong-generation", "slow-tickets")
