"""report.json, report.md and the plots, from a :class:`RunData`; and the invariants.

Definitions (also written into report.md):
* ``queries_failed`` counts failed queries and queries a client never reported (it died).
* ``wrong_accepted``: answered, and not what the whole model computes (within 1e-4).
* ``faults_detected``: committee verdicts other than "agree" (and "not-asked": a member held
  back by quorum-first dispatch whose round ended first, not scored), by kind, over all queries.
* ``failovers``: failed hops re-routed plus committee stage re-runs.
* ``recovery_ms``: from each kill to the end of the first query sent after it that was
  answered (how long the swarm took to serve again); ``rejoin_ms``: from a restart to the
  restarted peer appearing in an answered query's route.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import InvariantBroken
from ..proto.consensus import NOT_ASKED
from .record import RunData

NOT_FAULTS = ("agree", NOT_ASKED)


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in ps}
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in ps:
        rank = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))  # nearest rank
        out[f"p{p}"] = round(ordered[rank], 2)
    return out


def recovery(data: RunData) -> tuple[list[float], list[float]]:
    answered = [q for q in data.queries if q.ok]
    rec, rejoin = [], []
    for ev in data.events:
        if ev.kind == "kill":
            after = [q.t0_s + q.latency_ms / 1000 for q in answered if q.t0_s >= ev.t_s]
            if after:
                rec.append((min(after) - ev.t_s) * 1000)
        elif ev.kind in ("ready", "joined") and ev.peer_id:
            seen = [q.t0_s + q.latency_ms / 1000 for q in answered if ev.peer_id in q.route and q.t0_s >= ev.t_s]
            if seen:
                rejoin.append((min(seen) - ev.t_s) * 1000)
    return rec, rejoin


def summary(data: RunData) -> dict[str, Any]:
    qs = data.queries
    answered = [q for q in qs if q.ok]
    faults: Counter[str] = Counter()
    for q in qs:
        faults.update(v for v in q.verdicts.values() if v not in NOT_FAULTS)
    rec, rejoin = recovery(data)
    unreported = max(0, data.planned - len(qs))
    sent = len(qs) + unreported
    wrong = sum(q.wrong for q in answered)
    sc = data.scenario
    return {
        "scenario": sc.name, "engine": sc.engine, "peers": sc.peers, "mode": sc.load.mode, "seed": sc.seed,
        "queries_sent": sent, "queries_answered": len(answered), "queries_failed": sent - len(answered),
        "queries_unreported": unreported,
        "success_rate": round(len(answered) / sent, 4) if sent else 0.0,
        "wrong_accepted": wrong,
        "faults_detected": dict(sorted((k, v) for k, v in faults.items() if v)),
        "failure_codes": dict(Counter(q.code for q in qs if not q.ok)),
        "latency_ms": percentiles([q.latency_ms for q in answered]),
        "failovers": sum(q.retries for q in qs),
        "recovery_ms": percentiles(rec, (50, 95)), "rejoin_ms": percentiles(rejoin, (50, 95)),
        "route_length": percentiles([float(q.hops) for q in answered], (50, 95)),
        "processes_left": data.processes_left,
        "churn_events": [asdict(e) for e in data.events],
        "adversaries": dict(Counter(r for r in data.roles.values() if r != "honest")),
        "final_reputation": final_reputation(data),
        "wall_s": round(data.wall_s, 1),
        "scenario_note": sc.note,
        **data.extra,
    }


def final_reputation(data: RunData) -> dict[str, float | None]:
    if not data.reputation:
        return {}
    scores = data.reputation[-1][1]
    out: dict[str, float | None] = {}
    for role in sorted(set(data.roles.values())):
        values = [scores.get(p, 1.0) for p, r in data.roles.items() if r == role]
        out[role] = round(statistics.mean(values), 3) if values else None
    return out


def check_invariants(report: dict[str, Any], data: RunData) -> list[str]:
    inv = data.scenario.invariants
    broken = []
    if report["wrong_accepted"] > inv.max_wrong_accepted:
        broken.append(f"wrong results accepted: {report['wrong_accepted']} > {inv.max_wrong_accepted}")
    if report["success_rate"] < inv.min_success:
        broken.append(f"success {report['success_rate']:.2%} < {inv.min_success:.0%}")
    if report["processes_left"] > inv.max_processes_left:
        broken.append(f"processes left running: {report['processes_left']}")
    if report.get("netns_left"):
        broken.append(f"network namespaces or links left: {report['netns_left']}")
    return broken


def reading(report: dict[str, Any], broken: list[str]) -> str:
    lat = report["latency_ms"]
    lines = [
        f"# Simulation `{report['scenario']}` ({report['engine']}, {report['peers']} peers, mode {report['mode']})", "",
        f"{report['queries_answered']} of {report['queries_sent']} queries answered ({report['success_rate']:.2%}), "
        f"{report['queries_failed']} failed, **{report['wrong_accepted']} wrong results accepted**. "
        f"Latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms. "
        f"{report['failovers']} failovers; recovery after a kill p50 {report['recovery_ms']['p50']} ms, "
        f"p95 {report['recovery_ms']['p95']} ms.", "",
        f"Faults detected: {report['faults_detected'] or 'none'}; adversaries placed: {report['adversaries'] or 'none'}; "
        f"mean reputation at the end by role: {report['final_reputation'] or 'n/a'}.", "",
        f"Processes left running after the run: {report['processes_left']}. Wall time {report['wall_s']} s.", "",
        "Invariants: " + ("**all held**." if not broken else "**BROKEN**: " + "; ".join(broken) + "."), "",
        "Plots: latency.png (latency over time), reputation.png (honest vs dishonest), outcomes.png "
        "(answered/failed over time, churn marked), routes.png (route lengths).", "",
        "Definitions are in `p2p_infer/sim/report.py`'s docstring.",
    ]
    if report.get("trials"):
        t = report["trials"]
        lines += ["", f"Trials (proto.trial): {t['sent']} sent, {t['passed']} passed, {t['failed']} answered wrongly, "
                      f"{t['unanswered']} unanswered; {t['gating']} held a query up."]
    if report.get("gossip"):
        g = report["gossip"]
        lines += ["", f"Audit gossip: {g['published']} published, {g['transmissions']:,} transmissions "
                      f"({g['messages_per_peer_per_query']} per peer per query, mesh degree {g['mesh_degree']}); "
                      f"auditor CPU {g['audit_cpu_ms_per_message']} ms per message, {g['audit_cpu_ms_per_peer_per_query']} ms per peer "
                      f"per query; evidence found from gossip {g['evidence_found_by_auditors'] or 'none'}; "
                      f"sampled auditors' mean reputation by role {g['auditor_reputation'] or 'n/a'}."]
    if report.get("network"):
        from .netreport import network_lines

        lines += network_lines(report["network"])
    for key in ("scenario_note", "note"):
        if report.get(key):
            lines += ["", report[key]]
    return "\n".join(lines) + "\n"


def write_report(data: RunData, out: Path, plots: bool = True) -> tuple[dict[str, Any], list[str]]:
    out.mkdir(parents=True, exist_ok=True)
    report = summary(data)
    broken = check_invariants(report, data)
    report["invariants_broken"] = broken
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(reading(report, broken))
    if plots:
        from .plots import plot_run

        plot_run(data, out)
    return report, broken


def enforce(broken: list[str], out: Path) -> None:
    if broken:
        raise InvariantBroken(f"invariants broken ({out / 'report.json'}): " + "; ".join(broken))
