"""The discrete-event scale sweep for docs/simulations.md: ``simulations/scale.toml`` at N
from 100 to 10,000 peers (20% colluding), and at N = 1,000 with a dishonest share from 0
to past 1/3; one JSON of figures and the plots.

    python -m p2p_infer.sim.sweep --out docs/simulations [--sizes 100,1000,10000] [--shares 0,0.1,0.2,0.33,0.4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .des.engine import DesRun
from .report import summary
from .scenario import load_scenario

SCENARIO = Path(__file__).resolve().parents[2] / "simulations" / "scale.toml"
KEYS = ("queries_answered", "queries_failed", "wrong_accepted", "latency_ms", "route_length", "dht_lookup_hops", "dht_lookup_ms",
        "consensus_ms", "events", "events_per_s", "build_s", "wall_s", "identities_used", "identities_generated", "final_reputation",
        "trials", "gossip", "client_requests_per_query")


def one(peers: int, share: float, queries: int | None) -> dict[str, Any]:
    sc = load_scenario(SCENARIO)
    churn = replace(sc.churn, rate_per_s=sc.churn.rate_per_s * peers / sc.peers)  # the same share of peers down at every N
    sc = replace(sc, name=f"scale-{peers}-{share}", peers=peers, adversaries=replace(sc.adversaries, share=share),
                 load=replace(sc.load, queries=queries or sc.load.queries), churn=churn)
    started = time.monotonic()
    report = summary(DesRun(sc, progress=True).run())
    row = {"peers": peers, "share": share, **{k: report.get(k) for k in KEYS}}
    row["wrong_share"] = round(report["wrong_accepted"] / max(1, report["queries_answered"]), 4)
    row["run_wall_s"] = round(time.monotonic() - started, 1)
    sys.stderr.write(json.dumps(row) + "\n")
    return row


def plot(rows: list[dict[str, Any]], out: Path, base_share: float, base_peers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_n = sorted((r for r in rows if r["share"] == base_share), key=lambda r: r["peers"])
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ns = [r["peers"] for r in by_n]
    axes[0].plot(ns, [r["dht_lookup_hops"]["p50"] for r in by_n], "o-", label="DHT lookup hops p50")
    axes[0].plot(ns, [r["dht_lookup_hops"]["p95"] for r in by_n], "o--", label="DHT lookup hops p95")
    axes[0].plot(ns, [r["route_length"]["p50"] for r in by_n], "s-", label="route length (stages) p50")
    axes[1].plot(ns, [r["latency_ms"]["p50"] for r in by_n], "o-", label="query p50")
    axes[1].plot(ns, [r["latency_ms"]["p95"] for r in by_n], "o--", label="query p95")
    axes[1].plot(ns, [r["dht_lookup_ms"]["p50"] for r in by_n], "s-", label="DHT lookup p50")
    axes[2].plot(ns, [r["wrong_share"] for r in by_n], "o-", label="wrong accepted / answered")
    gossip = [r.get("gossip") or {} for r in by_n]
    axes[3].plot(ns, [g.get("messages_per_peer_per_query") for g in gossip], "o-", label="gossip messages received per peer per query")
    axes[3].plot(ns, [sum((g.get("published_per_query") or {}).values()) for g in gossip], "s--", label="gossip messages published per query")
    for ax, title in zip(axes, ("hops", "latency (ms)", f"wrong results, {base_share:.0%} colluding", "audit gossip")):
        ax.set(xscale="log", xlabel="peers", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale-by-n.png", dpi=90)
    plt.close(fig)

    by_share = sorted((r for r in rows if r["peers"] == base_peers), key=lambda r: r["share"])
    shares = [r["share"] for r in by_share]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(shares, [r["wrong_share"] for r in by_share], "o-", label="measured: wrong accepted / answered")
    stage = [3 * s**2 * (1 - s) + s**3 for s in shares]  # P(>= 2 of 3 members collude), one stage
    ax.plot(shares, stage, "k:", label="bound, one stage: 3p²(1-p)+p³")
    ax.plot(shares, [1 - (1 - b) ** 2 for b in stage], "k--", label="bound, a 2-stage query: 1-(1-b)²")
    ax.axvline(1 / 3, color="grey", linestyle=":", label="1/3")
    ax.set(xlabel="colluding share of peers", ylabel="share", title=f"N = {base_peers}: wrong results accepted")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale-by-share.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="p2p_infer.sim.sweep")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", default="100,1000,3000,10000")
    p.add_argument("--shares", default="0,0.1,0.2,0.33,0.4")
    p.add_argument("--base-share", type=float, default=0.2)
    p.add_argument("--base-peers", type=int, default=1000)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--plot-only", action="store_true", help="re-plot OUT/sweep.json")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads((args.out / "sweep.json").read_text()), args.out, args.base_share, args.base_peers)
        return 0
    from ..logs import configure_logging

    configure_logging("console", "warning")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(n, args.base_share) for n in map(int, args.sizes.split(","))]
    runs += [(args.base_peers, s) for s in map(float, args.shares.split(",")) if (args.base_peers, s) not in runs]
    rows = []
    for peers, share in runs:
        rows.append(one(peers, share, args.queries))
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")  # kept as it grows
    plot(rows, args.out, args.base_share, args.base_peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
