"""Query modes a simulation can drive: one entry each, name -> client keyword arguments.

Each mode passes everything explicitly (the client's defaults may change: committee-of-3 is
becoming the default, and plain queries then need ``unverified=True``), so a scenario means
the same before and after. ``verified`` says whether a wrong answer accepted in this mode
breaks the ``max_wrong_accepted`` invariant: a plain query checks nothing, by definition.
Adding a mode (optimistic, generation) is one line here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mode:
    verified: bool
    options: tuple[tuple[str, Any], ...]  # client keyword arguments; "{committee}" etc. filled from the scenario
    unverified_flag: bool = False  # pass unverified=True where the client has the keyword


MODES: dict[str, Mode] = {
    "plain": Mode(False, (("committee", None),), unverified_flag=True),
    "spot-check": Mode(True, (("committee", None), ("spot_check", 1.0)), unverified_flag=True),
    "optimistic": Mode(True, (("committee", None), ("optimistic", "{optimistic}"))),
    "committee": Mode(True, (("committee", "{committee}"), ("commit_timeout", "{commit_timeout_s}"), ("max_reruns", "{max_reruns}"))),
}


def client_options(mode: str, values: dict[str, Any], client_init: Any) -> dict[str, Any]:
    """The keyword arguments for ``Client(...)`` in ``mode``, with the scenario's values filled in."""
    spec = MODES[mode]
    out: dict[str, Any] = {}
    for key, value in spec.options:
        out[key] = values[value[1:-1]] if isinstance(value, str) and value.startswith("{") else value
    if spec.unverified_flag and "unverified" in inspect.signature(client_init).parameters:
        out["unverified"] = True
    return out
