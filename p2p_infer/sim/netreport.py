"""The network section of a netns run's report: what each shaped link and each partition did.

* ``shape[j]``: answered queries (outside partitions) whose route includes one of the rule's
  peers, against those whose route includes none: their median latency (the added delay, the
  lossy or slow link); and the committee verdicts on those peers (a slow member is judged late
  or missing: a route only includes members that agreed in time).
* ``partition[j]``: queries sent while the group was cut off (answered / failed, and how many
  routes still included a group member: none can), and after the heal: the time until a group
  member is back in an answered route (``rejoin_after_heal_ms``) and the share answered.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from .record import RunData
from .scenario import Scenario


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def network_report(sc: Scenario, data: RunData, names: dict[str, str]) -> dict[str, Any]:
    cut = [(p.start_s, p.heal_s) for p in sc.network.partition]
    answered = [q for q in data.queries if q.ok and not any(a <= q.t0_s < b for a, b in cut)]  # outside partitions
    shapes = []
    for rule in sc.network.shape:
        ids = {names[n] for n in rule.peers if n in names}
        touched = [q.latency_ms for q in answered if ids & set(q.route)]
        others = [q.latency_ms for q in answered if not ids & set(q.route)]
        verdicts = Counter(v for q in data.queries for p, v in q.verdicts.items() if p in ids)
        shapes.append({"peers": rule.peers, "to": rule.to, "delay_ms": rule.delay_ms, "jitter_ms": rule.jitter_ms,
                       "loss": rule.loss, "rate_mbit": rule.rate_mbit, "queries_through": len(touched),
                       "latency_p50_through_ms": _median(touched), "latency_p50_others_ms": _median(others),
                       "verdicts": dict(verdicts)})
    return {"mode": "netns", "shape": shapes, "partition": [_partition(p, data, names) for p in sc.network.partition]}


def _partition(part: Any, data: RunData, names: dict[str, str]) -> dict[str, Any]:
    ids = {names[n] for n in part.peers if n in names}
    during = [q for q in data.queries if part.start_s <= q.t0_s < part.heal_s]
    after = [q for q in data.queries if q.t0_s >= part.heal_s]
    back = [q.t0_s + q.latency_ms / 1000 for q in after if q.ok and ids & set(q.route)]
    return {
        "peers": part.peers, "start_s": part.start_s, "heal_s": part.heal_s,
        "during": {"sent": len(during), "answered": sum(q.ok for q in during), "failed": sum(not q.ok for q in during),
                   "routes_through_group": sum(bool(q.ok and ids & set(q.route)) for q in during),
                   "latency_p50_ms": _median([q.latency_ms for q in during if q.ok])},
        "after": {"sent": len(after), "answered": sum(q.ok for q in after),
                  "latency_p50_ms": _median([q.latency_ms for q in after if q.ok])},
        "before": {"latency_p50_ms": _median([q.latency_ms for q in data.queries if q.ok and q.t0_s < part.start_s])},
        "rejoin_after_heal_ms": round((min(back) - part.heal_s) * 1000, 1) if back else None,
    }


def network_lines(net: dict[str, Any]) -> list[str]:
    """report.md's reading of the network section."""
    lines = ["", "Network (namespaces, kernel shaping):"]
    for s in net["shape"]:
        what = ", ".join(f"{k} {s[k]}" for k in ("delay_ms", "jitter_ms", "loss", "rate_mbit") if s[k])
        lines.append(f"* {'/'.join(s['peers'])} -> {'/'.join(s['to']) or 'all'} ({what}): {s['queries_through']} answered "
                     f"queries through them, p50 {s['latency_p50_through_ms']} ms against {s['latency_p50_others_ms']} ms for the others; "
                     f"verdicts on them {s['verdicts'] or 'none'}.")
    for p in net["partition"]:
        d, a = p["during"], p["after"]
        lines.append(f"* partition of {'/'.join(p['peers'])} from {p['start_s']} s to {p['heal_s']} s: during it {d['answered']} of "
                     f"{d['sent']} answered ({d['failed']} failed, {d['routes_through_group']} routes through the group, p50 "
                     f"{d['latency_p50_ms']} ms against {p['before']['latency_p50_ms']} ms before); after the heal {a['answered']} of "
                     f"{a['sent']} answered, a group member back in an answered route after {p['rejoin_after_heal_ms']} ms.")
    return lines
