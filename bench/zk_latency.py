"""ZK benchmark: per digits shard, circuit setup (once), prove, verify, proof and key sizes,
prover memory; and end-to-end critical-mode latency vs general mode over 2 peers.

    .venv/bin/python bench/zk_latency.py [--proofs 5] [--queries 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer import zk  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.ml.models import DigitsMLP, load_model  # noqa: E402

RANGES = [(1, 2), (3, 3)]


def per_shard(n: int) -> None:
    model = load_model("digits-mlp")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        x = DigitsMLP.dataset()[2][0].tolist()
        h = model.run_layers(model.embed(x), 0, 0).flatten().tolist()
        for first, last in RANGES:
            start = time.perf_counter()
            circuit = zk.circuits_for(model, [(first, last)], cache)[(first, last)]
            setup_s = time.perf_counter() - start
            prove_ms, witness_ms, verify_ms = [], [], []
            for _ in range(n):
                r = zk.run_and_prove(str(circuit.directory), circuit.logrows, str(circuit.srs), h, str(cache / "w"))
                prove_ms.append(r["prove_ms"])
                witness_ms.append(r["witness_ms"])
                proof = zk.ShardProof(first, last, r["proof"], tuple(r["instances"]))
                t = time.perf_counter()
                zk.verify_proof(proof, circuit.settings, circuit.vk, circuit.srs, cache / "v")
                verify_ms.append((time.perf_counter() - t) * 1000)
            print(json.dumps({
                "shard": f"{first}-{last}", "logrows": circuit.logrows,
                "setup_s_incl_srs_and_calibration": round(setup_s, 2),
                "prove_ms_median": round(statistics.median(prove_ms), 1),
                "witness_ms_median": round(statistics.median(witness_ms), 1),
                "verify_ms_median": round(statistics.median(verify_ms), 1),
                "proof_bytes": len(r["proof"]), "pk_bytes": circuit.pk.stat().st_size, "vk_bytes": circuit.vk.stat().st_size,
                "srs_bytes": circuit.srs.stat().st_size,
                "peak_rss_mb_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }), flush=True)
            h = r["outputs"]
        shutil.rmtree(cache / "w", ignore_errors=True)


async def query_times(bootstrap: str, n: int, critical: bool) -> list[float]:
    x_test = DigitsMLP.dataset()[2]
    async with Client([bootstrap], critical=critical, unverified=not critical) as c:
        await c.classify(x_test[0].tolist())  # warm-up: circuits built, prover processes started
        out = []
        for i in range(1, n + 1):
            r = await c.classify(x_test[i].tolist())
            assert not critical or (r.proofs and r.proofs["verified"])
            out.append(r.total_ms)
        return out


def end_to_end(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=300) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([["digits-mlp:1-2"], ["digits-mlp:3-3"]])
        swarm.wait_discoverable()
        general = statistics.median(trio.run(query_times, swarm.bootstrap.addr, n, False))
        critical = statistics.median(trio.run(query_times, swarm.bootstrap.addr, n, True))
        print(json.dumps({"queries": n, "general_median_ms": round(general, 1), "critical_median_ms": round(critical, 1),
                          "ratio": round(critical / general, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proofs", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args()
    quiet_libp2p_logging()
    per_shard(args.proofs)
    end_to_end(args.queries)


if __name__ == "__main__":
    main()
