"""Tables fed by the network stay bounded: one rule, used wherever one is kept."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any


def trim_oldest(table: MutableMapping[Any, Any], limit: int) -> None:
    """Forget the entries inserted first until at most ``limit`` are left (dicts keep
    insertion order; move an entry to the end to keep it longer)."""
    while len(table) > limit:
        del table[next(iter(table))]
