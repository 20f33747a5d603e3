"""Deterministic next-token choice: greedy, or temperature / top-k / top-p with seeded Gumbel-max.

Sans-IO and torch-free: logits arrive as a float array and are widened to float64 before
any arithmetic, so the choice depends only on the logits, the settings, the request seed
and the token's index, never on a global random state or on which honest route computed
them. Noise for token ``index`` of a request with seed ``seed`` is PCG64 seeded by numpy's
``SeedSequence([seed, index])``: one independent, reproducible stream per token (numpy
documents PCG64 and SeedSequence as stable across platforms and versions).

Gumbel-max: ``argmax(log p_i + g_i)`` with ``g_i = -log(-log u_i)`` draws ``i`` with
probability ``p_i``; tokens cut by top-k / top-p get ``-inf`` and are never drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax; the seed is unused)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0

    def validate(self) -> Sampling:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise UsageError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be in [0, 2^63), got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_wire(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


def gumbel_noise(seed: int, index: int, size: int) -> np.ndarray:
    """Gumbel(0, 1) noise for token ``index`` of the request seeded ``seed``, float64."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
    u = rng.random(size)  # [0, 1)
    u = np.clip(u, np.finfo(np.float64).tiny, 1.0 - np.finfo(np.float64).epsneg)
    return -np.log(-np.log(u))


def filtered_log_probs(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """log softmax(logits / T) with the tokens outside top-k and top-p set to -inf."""
    z = np.asarray(logits, dtype=np.float64) / s.temperature
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    keep = np.ones(logp.shape, dtype=bool)
    order = np.argsort(-logp, kind="stable")  # ties broken by token id: deterministic
    if 0 < s.top_k < logp.size:
        keep[order[s.top_k:]] = False
    if s.top_p < 1.0:
        cumulative = np.cumsum(np.exp(logp[order]))
        # smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cumulative, s.top_p, side="left")) + 1
        keep[order[cut:]] = False
    return np.where(keep, logp, -np.inf)


def choose(logits: np.ndarray, s: Sampling, index: int) -> int:
    """The token for position ``index`` (0 = the first generated token) of this request."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise UsageError("logits must be a non-empty finite vector")
    if s.greedy:
        return int(np.argmax(values))  # first maximum: ties go to the lowest id
    scores = filtered_log_probs(values, s) + gumbel_noise(s.seed, index, values.size)
    return int(np.argmax(scores))
