"""The run's PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .record import RunData  # noqa: E402

CHURN_COLOURS = {"kill": "red", "restart": "orange", "ready": "green", "joined": "blue", "join": "blue",
                 "partition": "purple", "heal": "teal"}


def _mark_churn(ax: plt.Axes, data: RunData) -> None:
    seen = set()
    for ev in data.events:
        label = ev.kind if ev.kind not in seen else None
        seen.add(ev.kind)
        ax.axvline(ev.t_s, color=CHURN_COLOURS.get(ev.kind, "grey"), linestyle="--", linewidth=0.8, label=label)


def plot_run(data: RunData, out: Path) -> None:
    answered = [q for q in data.queries if q.ok]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter([q.t0_s for q in answered], [q.latency_ms for q in answered], s=8, label="answered")
    _mark_churn(ax, data)
    ax.set(xlabel="time since load start (s)", ylabel="latency (ms)", title=f"{data.scenario.name}: query latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    roles = sorted(set(data.roles.values()))
    for role in roles:
        peers = [p for p, r in data.roles.items() if r == role]
        ts = [t for t, _ in data.reputation]
        means = [sum(s.get(p, 1.0) for p in peers) / len(peers) for _, s in data.reputation]
        ax.plot(ts, means, label=f"{role} ({len(peers)})")
    ax.set(xlabel="time (s)", ylabel="mean reputation (client's table)", title="reputation: honest vs dishonest", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reputation.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    qs = sorted(data.queries, key=lambda q: q.t0_s)
    ok = fail = 0
    xs, oks, fails = [], [], []
    for q in qs:
        ok += q.ok
        fail += not q.ok
        xs.append(q.t0_s)
        oks.append(ok)
        fails.append(fail)
    ax.plot(xs, oks, label="answered (cumulative)")
    ax.plot(xs, fails, label="failed (cumulative)", color="red")
    _mark_churn(ax, data)
    ax.set(xlabel="time (s)", ylabel="queries", title="answered and failed, churn marked")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "outcomes.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    hops = [q.hops for q in answered]
    if hops:
        ax.hist(hops, bins=range(0, max(hops) + 2), align="left", rwidth=0.8)
    ax.set(xlabel="route length (hops or committee stages)", ylabel="queries", title="route lengths")
    fig.tight_layout()
    fig.savefig(out / "routes.png", dpi=90)
    plt.close(fig)
