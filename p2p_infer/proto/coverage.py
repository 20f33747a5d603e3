"""Which layers a new peer should serve: where the network's coverage is weakest, within a
memory budget (``peer --serve MODEL`` without a range).

As Petals' block selection (``choose_best_blocks``): each layer's coverage is the sum of the
throughput of the live providers that serve it; among the spans of as many layers as the
budget holds, the peer takes the one whose sorted coverage is lexicographically smallest
(its weakest layer first, then the next weakest), the lowest start on a tie. A provider
whose record claims no throughput still counts as one layer per second, so a layer served
only by unmeasured peers is not mistaken for an uncovered one.

Sans-IO: the peer's driver reads the directory, and passes the providers, the layers'
weight sizes and the budget in (``node/peer.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

UNMEASURED_THROUGHPUT = 1.0  # layer forwards/s credited to a provider whose record claims none
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


@dataclass(frozen=True)
class Provider:
    """One live record's shard of the model: who serves which layers, and how fast it says it is."""

    peer_id: str
    first: int
    last: int
    throughput: float


@dataclass(frozen=True)
class SpanChoice:
    first: int
    last: int
    coverage: tuple[float, ...]  # every layer's coverage before this peer joins (index = layer)
    span_bytes: int
    reason: str


def parse_size(text: str) -> int:
    """``"200MB"``, ``"1.5GiB"``, ``"4096"`` to bytes (ConfigError names a malformed one)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"memory-budget: expected a size such as 512MB or 2GiB, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory-budget must be positive, got {text!r}")
    return size


def layer_coverage(num_layers: int, providers: Sequence[Provider], exclude: str = "") -> list[float]:
    """Throughput-weighted coverage of each layer (``exclude``: this peer's own old record)."""
    coverage = [0.0] * num_layers
    for p in providers:
        if p.peer_id == exclude:
            continue
        weight = p.throughput if p.throughput > 0 else UNMEASURED_THROUGHPUT
        for layer in range(max(p.first, 0), min(p.last, num_layers - 1) + 1):
            coverage[layer] += weight
    return coverage


def choose_span(layer_bytes: Sequence[int], providers: Sequence[Provider], budget_bytes: int, *,
                first_servable: int = 1, exclude: str = "") -> SpanChoice:
    """The span to serve: as long as the budget allows, where coverage is weakest.

    ``layer_bytes[i]`` is layer i's weight size; layers below ``first_servable`` stay with
    clients (they run the embedding and at least layer 0 themselves)."""
    num_layers = len(layer_bytes)
    if first_servable >= num_layers:
        raise ConfigError(f"the model has {num_layers} layers; none from {first_servable} on to serve")
    coverage = layer_coverage(num_layers, providers, exclude)
    length = _longest_fit(layer_bytes, first_servable, budget_bytes)
    if length == 0:
        smallest = min(layer_bytes[first_servable:])
        raise ConfigError(f"memory budget of {_mib(budget_bytes)} holds no layer: the smallest needs {_mib(smallest)}")
    windows = [i for i in range(first_servable, num_layers - length + 1) if sum(layer_bytes[i:i + length]) <= budget_bytes]
    start = min(windows, key=lambda i: (sorted(coverage[i:i + length]), i))
    last = start + length - 1
    span_bytes = sum(layer_bytes[start:last + 1])
    shown = ", ".join(f"{i}: {coverage[i]:.1f}" for i in range(first_servable, num_layers))
    reason = (f"layers {start}-{last} have the weakest throughput-weighted coverage (layer: forwards/s served now: {shown}); "
              f"{_mib(budget_bytes)} budget holds {length} layer(s), {_mib(span_bytes)}")
    return SpanChoice(start, last, tuple(coverage), span_bytes, reason)


def _longest_fit(layer_bytes: Sequence[int], first: int, budget: int) -> int:
    """The most consecutive layers (from ``first`` on) whose weights fit in ``budget`` together."""
    best = 0
    for start in range(first, len(layer_bytes)):
        total, n = 0, 0
        for size in layer_bytes[start:]:
            if total + size > budget:
                break
            total, n = total + size, n + 1
        best = max(best, n)
    return best


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
