"""Where a committee query's fixed cost goes: digits-mlp (negligible compute) on 3 peers that
each serve every stage, N committee-of-3 queries after 3 warm-up ones, with the client and
every peer process under cProfile. Prints, per query, how often each process runs the
expensive checks (VRF proofs and verifications, record and candidate-set checks, Ed25519
verifications, audited gossip rounds) and its CPU seconds in them (profiled, so inflated
3-5x; the counts are exact).

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/consensus_profile.py [--queries 20]
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import json
import os
import pstats
import stat
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.ml.models import DigitsMLP  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402

STAGES = ["digits-mlp:1-1", "digits-mlp:2-2", "digits-mlp:3-3"]
WATCH = {"vrf.verify": ("vrf.py", "verify"), "vrf.prove": ("vrf.py", "prove"), "candidate-set checks": ("sortition.py", "_verify"),
         "record checks": ("records.py", "verify_record"), "Ed25519 verify": ("~", "<built-in method _sodium.crypto_sign_open>"),
         "audited rounds": ("auditor.py", "on_round")}


# where each process's own CPU goes (self time of every function, by the file it lives in)
AREAS = {"gossipsub/pubsub": ("libp2p/pubsub",), "yamux/noise/streams": ("libp2p/stream_muxer", "libp2p/security", "libp2p/network",
         "libp2p/io", "libp2p/host"), "other libp2p": ("libp2p/",), "trio": ("trio/", "anyio/", "outcome/"),
         "crypto (sodium, vrf, hashes)": ("nacl/", "vrf.py", "hashlib", "_sodium", "crypto_"),
         "msgpack/tensors": ("msgpack", "tensors.py", "numpy"), "torch": ("torch/",), "structlog/logging": ("structlog", "logging/"),
         "p2p_infer": ("p2p_infer/",)}


WAITS = ("poll", "select", "sleep", "acquire", "wait", "recv", "read", "accept")


def areas(path: str, per: int) -> dict[str, float]:
    """Self CPU ms per query by area (profiled: inflated 3-5x; the shares are what count)."""
    st = pstats.Stats(path).stats  # type: ignore[attr-defined]
    out = dict.fromkeys([*AREAS, "rest"], 0.0)
    idle = 0.0
    for (file, _line, fn), row in st.items():
        where = f"{file}:{fn}"
        if file == "~" and any(w in fn for w in WAITS):  # blocked, not computing: left out of the total
            idle += row[2]
            continue
        area = next((a for a, keys in AREAS.items() if any(k in where for k in keys)), "rest")
        out[area] += row[2]
    total = sum(out.values())
    return {"total": round(total / per * 1000, 1), **{a: round(v / per * 1000, 1) for a, v in out.items() if v},
            "(waiting, not in total)": round(idle / per * 1000, 1)}


def proves(path: str) -> int:
    st = pstats.Stats(path).stats  # type: ignore[attr-defined]
    return sum(v[0] for k, v in st.items() if k[0].endswith("vrf.py") and k[2] == "prove")


def counts(path: str, per: int) -> dict[str, list[float]]:
    st = pstats.Stats(path).stats  # type: ignore[attr-defined]
    out = {}
    for name, (file, fn) in WATCH.items():
        rows = [v for k, v in st.items() if k[0].endswith(file) and k[2] == fn]
        out[name] = [round(sum(r[0] for r in rows) / per, 1), round(sum(r[3] for r in rows) / per * 1000, 1)]
    return out


async def queries(addr: str, n: int, out: Path) -> None:
    inputs = DigitsMLP.dataset()[2][0].tolist()
    async with Client([addr], committee=3) as c:
        for _ in range(3):
            await c.run("digits-mlp", inputs)
        prof = cProfile.Profile()
        prof.enable()
        walls = []
        for _ in range(n):
            r = await c.run("digits-mlp", inputs)
            walls.append((r.total_ms, [h.round_trip_ms for h in r.route]))
        prof.disable()
        prof.dump_stats(str(out / "client.prof"))
    # wall time of a query (profiled, so slower than the benchmark): stage round trips vs the rest (tickets, local)
    total = statistics.median(w for w, _ in walls)
    stages = [statistics.median(s[i] for _, s in walls) for i in range(len(walls[0][1]))]
    print(json.dumps({"client_wall_ms_median": {"query": round(total, 2), "stages": [round(x, 2) for x in stages],
                                                "rest (tickets, local layers, head)": round(total - sum(stages), 2)}}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    quiet_libp2p_logging()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        wrapper = out / "python"  # every peer process runs under cProfile, written at its clean exit
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m cProfile -o {out}/peer-$$.prof "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
        with Swarm(out / "swarm", record_ttl=300, python=str(wrapper)) as swarm:
            swarm.start_bootstrap()
            swarm.start_peers([STAGES] * 3)
            swarm.wait_discoverable(timeout=120)
            trio.run(queries, swarm.bootstrap.addr, args.queries, out)
        client = str(out / "client.prof")
        print(json.dumps({"process": "client", "per_query_calls_and_profiled_ms": counts(client, args.queries),
                          "self_cpu_ms_per_query": areas(client, args.queries)}))
        for path in sorted(glob.glob(str(out / "peer-*.prof"))):  # peers: whole run, warm-up included
            row = counts(path, args.queries + 3)
            role = "member" if proves(path) else "bootstrap"  # session tickets: a member proves ~once per run
            print(json.dumps({"process": role, "pid": os.path.basename(path)[5:-5], "per_query_calls_and_profiled_ms": row,
                              "self_cpu_ms_per_query": areas(path, args.queries + 3)}))


if __name__ == "__main__":
    main()
