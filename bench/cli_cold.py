"""Cold CLI query time: ``p2p-infer query`` as a new process each time, start to answer.

A local swarm (a bootstrap peer, one peer serving digits-mlp layers 1-3) stays up; each run
starts ``python -m p2p_infer.cli query --model digits-mlp --unverified test:N`` afresh, so
every run pays interpreter start, imports, join and directory refresh. With ``--baseline
DIR`` (a checkout of an older commit) the same query from that tree runs interleaved, in the
same swarm and hour, and the ratio is printed. ``--phases`` also times the phases of one
query in-process (imports, join + directory, the query itself, leaving).

    flock /work/bench.lock env PYTHONPATH=$PWD .venv/bin/python bench/cli_cold.py --runs 7 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2p_infer.testing.harness import Swarm  # noqa: E402


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_s": round(statistics.median(values), 3), "mean_s": round(statistics.mean(values), 3),
            "p95_s": round(p95, 3), "n": len(values)}


def cold_query(tree: Path, bootstrap: str, index: int, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) for one query process started from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "p2p_infer.cli", "query", "--bootstrap", bootstrap, "--model", "digits-mlp",
                             "--unverified", "--json", f"test:{index}"], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"query from {tree} failed:\n{result.stderr[-2000:]}")
    json.loads(result.stdout)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


PHASES = """
import time, json, sys
t0 = time.perf_counter()
import trio
from p2p_infer.node.client import Client
from p2p_infer.ml.models import DigitsMLP
t1 = time.perf_counter()
async def main():
    a = time.perf_counter()
    async with Client([sys.argv[1]], unverified=True) as c:
        b = time.perf_counter()
        await c.run("digits-mlp", DigitsMLP.dataset()[2][0].tolist())
        d = time.perf_counter()
    e = time.perf_counter()
    return {"join_and_directory_s": b - a, "query_s": d - b, "leave_s": e - d}
out = trio.run(main)
print(json.dumps({"imports_s": t1 - t0, **{k: round(v, 3) for k, v in out.items()}}))
"""


def phases(bootstrap: str, cwd: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PHASES, bootstrap], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--phases", action="store_true")
    args = parser.parse_args()
    trees = {"branch": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    with tempfile.TemporaryDirectory(prefix="cli-cold-") as tmp, Swarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([["digits-mlp:1-3"]])
        swarm.wait_discoverable()
        walls: dict[str, list[float]] = {name: [] for name in trees}
        cpus: dict[str, list[float]] = {name: [] for name in trees}
        cold_query(ROOT, swarm.bootstrap.addr, 0, Path(tmp))  # warm the page cache, not the process
        for i in range(args.runs):
            for name, tree in trees.items():  # interleaved: both see the same load
                wall, cpu = cold_query(tree, swarm.bootstrap.addr, i + 1, Path(tmp))
                walls[name].append(wall)
                cpus[name].append(cpu)
        report = {name: {"wall": stats(walls[name]), "cpu": stats(cpus[name])} for name in trees}
        if "baseline" in trees:
            report["ratio_branch_over_baseline"] = {
                k: round(report["branch"]["wall"][k] / report["baseline"]["wall"][k], 3) for k in ("median_s", "mean_s", "p95_s")}
        if args.phases:
            report["phases_branch"] = phases(swarm.bootstrap.addr, Path(tmp))
        report["loadavg"] = os.getloadavg()
        print(json.dumps(report))


if __name__ == "__main__":
    main()
