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
        for _ in range(n):
            await c.run("digits-mlp", inputs)
        prof.disable()
        prof.dump_stats(str(out / "client.prof"))


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
        print(json.dumps({"process": "client", "per_query_calls_and_profiled_ms": counts(str(out / "client.prof"), args.queries)}))
        for path in sorted(glob.glob(str(out / "peer-*.prof"))):  # peers: whole run, warm-up included
            row = counts(path, args.queries + 3)
            role = "member" if row["vrf.prove"][0] else "bootstrap"
            print(json.dumps({"process": role, "pid": os.path.basename(path)[5:-5], "per_query_calls_and_profiled_ms": row}))


if __name__ == "__main__":
    main()
