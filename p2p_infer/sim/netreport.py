"""The network section of a netns run's report: what each shaped link and each partition did.

* ``shape[j]``: answered queries (outside partitions) whose route includes one of the rule's
  peers, against those whose route includes none: their median latency; the same per stage
  (``stages_through`` / ``stage_p50_through_ms`` against ``stage_p50_others_ms``: a stage whose
  quorum needed a shaped peer's answer, against stages whose quorum had none: what the slow
  link adds where it must be used); and the final committee verdicts on those peers (a member
  too slow for the commit deadline is judged late or missing). A route lists a stage's first
  quorum of agreeing members (the stage is decided then), so a slow member of a committee whose
  other two agreed first is judged but not routed through.
* ``partition[j]``: queries sent while the group was cut off (answered / failed, and how many
  routes still included a group member: none can), and after the heal: the time until a group
  member is back in an answered route (``rejoin_after_heal_ms``), the first query sent after
  the heal in which a group member's final verdict is "agree" (``agree_after_heal``: which query
  after the heal, and when that member was judged), the share answered, and the group's
  reputation at this client at the heal and at the end (it recovers by 1% per task agreed).
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
        hops = [h for q in answered for h in q.stages]
        through = [float(h["ms"]) for h in hops if ids & set(h["peers"])]
        other_hops = [float(h["ms"]) for h in hops if not ids & set(h["peers"])]
        verdicts = Counter(v for q in data.queries for p, v in q.verdicts.items() if p in ids)
        shapes.append({"peers": rule.peers, "to": rule.to, "delay_ms": rule.delay_ms, "jitter_ms": rule.jitter_ms,
                       "loss": rule.loss, "rate_mbit": rule.rate_mbit, "queries_through": len(touched),
                       "latency_p50_through_ms": _median(touched), "latency_p50_others_ms": _median(others),
                       "stages_through": len(through), "stages_others": len(other_hops),
                       "stage_p50_through_ms": _median(through), "stage_p50_others_ms": _median(other_hops),
                       "verdicts": dict(verdicts)})
    return {"mode": "netns", "shape": shapes, "partition": [_partition(p, data, names) for p in sc.network.partition]}


def _reputation_at(data: RunData, ids: set[str], t_s: float | None) -> dict[str, float]:
    """The client's reputation of ``ids`` at ``t_s`` (the last sample before it; None: the end)."""
    samples = [(t, s) for t, s in data.reputation if t_s is None or t <= t_s]
    if not samples:
        return {}
    scores = max(samples, key=lambda x: x[0])[1]
    return {p: round(scores[p], 3) for p in sorted(ids) if p in scores}


def _agree_after(after: list[Any], ids: set[str], heal_s: float) -> dict[str, Any] | None:
    """The first query sent after the heal in which a group member's final verdict is agree."""
    for n, q in enumerate(after):
        members = sorted(p for p, v in q.verdicts.items() if p in ids and v == "agree")
        if members:
            done = q.judged_s if q.judged_s is not None else q.t0_s + q.latency_ms / 1000
            return {"query_after_heal": n + 1, "sent_after_heal_ms": round((q.t0_s - heal_s) * 1000, 1),
                    "judged_after_heal_ms": round((done - heal_s) * 1000, 1), "members": members}
    return None


def _partition(part: Any, data: RunData, names: dict[str, str]) -> dict[str, Any]:
    ids = {names[n] for n in part.peers if n in names}
    during = [q for q in data.queries if part.start_s <= q.t0_s < part.heal_s]
    after = [q for q in data.queries if q.t0_s >= part.heal_s]
    back = [q.t0_s + q.latency_ms / 1000 for q in after if q.ok and ids & set(q.route)]
    return {
        "peers": part.peers, "start_s": part.start_s, "heal_s": part.heal_s,
        "during": {"sent": len(during), "answered": sum(q.ok for q in during), "failed": sum(not q.ok for q in during),
                   # answered before the heal (a query sent just before it may run its stages after)
                   "routes_through_group": sum(bool(q.ok and ids & set(q.route) and q.t0_s + q.latency_ms / 1000 < part.heal_s) for q in during),
                   "latency_p50_ms": _median([q.latency_ms for q in during if q.ok])},
        "after": {"sent": len(after), "answered": sum(q.ok for q in after),
                  "latency_p50_ms": _median([q.latency_ms for q in after if q.ok])},
        "before": {"latency_p50_ms": _median([q.latency_ms for q in data.queries if q.ok and q.t0_s < part.start_s])},
        "rejoin_after_heal_ms": round((min(back) - part.heal_s) * 1000, 1) if back else None,
        "agree_after_heal": _agree_after(after, ids, part.heal_s),
        "reputation": {"start": _reputation_at(data, ids, part.start_s), "heal": _reputation_at(data, ids, part.heal_s),
                       "end": _reputation_at(data, ids, None)},
    }


def network_lines(net: dict[str, Any]) -> list[str]:
    """report.md's reading of the network section."""
    lines = ["", "Network (namespaces, kernel shaping):"]
    for s in net["shape"]:
        what = ", ".join(f"{k} {s[k]}" for k in ("delay_ms", "jitter_ms", "loss", "rate_mbit") if s[k])
        lines.append(f"* {'/'.join(s['peers'])} -> {'/'.join(s['to']) or 'all'} ({what}): {s['queries_through']} answered "
                     f"queries through them, p50 {s['latency_p50_through_ms']} ms against {s['latency_p50_others_ms']} ms for the others; "
                     f"{s['stages_through']} stages whose quorum needed them, p50 {s['stage_p50_through_ms']} ms against "
                     f"{s['stage_p50_others_ms']} ms for the {s['stages_others']} other stages; final verdicts on them {s['verdicts'] or 'none'}.")
    for p in net["partition"]:
        d, a = p["during"], p["after"]
        lines.append(f"* partition of {'/'.join(p['peers'])} from {p['start_s']} s to {p['heal_s']} s: during it {d['answered']} of "
                     f"{d['sent']} answered ({d['failed']} failed, {d['routes_through_group']} routes through the group, p50 "
                     f"{d['latency_p50_ms']} ms against {p['before']['latency_p50_ms']} ms before); after the heal {a['answered']} of "
                     f"{a['sent']} answered, a group member back in an answered route after {p['rejoin_after_heal_ms']} ms; "
                     f"first agreeing again: {p['agree_after_heal'] or 'never'}; their reputation here at the cut, the heal and "
                     f"the end: {p['reputation']['start']}, {p['reputation']['heal']}, {p['reputation']['end']}.")
    return lines
