"""A request through a warm gateway against the same query in-process through a long-lived
Client, interleaved (gateway, in-process, gateway, ...), >= 50 of each after warm-up.

    .venv/bin/python bench/gateway_latency.py [--requests 50] [--modes unverified committee]

Three peers each serve MiniLM layers 1-5 (so a committee of 3 can run); one gateway process
(``p2p-infer gateway``) and one in-process ``Client`` join the same swarm. Both sides are
timed by the caller's wall clock: the HTTP POST /v1/embeddings (as the openai client sends
it: base64 floats) to its parsed JSON, and ``await client.run(...)`` to its result.
``overhead_ms`` is the gateway's wall time minus its own client's ``total_ms`` for that
request (what the HTTP layer, JSON and the evidence add on top of the query itself), split
into ``in_gateway_ms`` (the endpoint's own time, from its ``server-timing`` header, minus the
query) and ``transport_ms`` (the rest: HTTP on loopback and waiting for the CPU between
processes). ``http_floor`` times ``GET /health`` the same way, once per round.
Target (issue 14): gateway median <= in-process median + 5 ms, printed as ``targets_met``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.logs import configure_logging  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402

WARM_UP = 5
TEXT = "peers share the work of running one model so that no single machine holds it all"


def stats(runs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(runs), 2), "mean": round(statistics.mean(runs), 2),
            "p95": round(sorted(runs)[int(0.95 * (len(runs) - 1))], 2)}


def start_gateway(swarm: Swarm) -> str:
    ready = swarm.workdir / "gateway.ready"
    proc = swarm.start_tool("gateway", "p2p_infer.cli", ["gateway", "--bootstrap", swarm.bootstrap.addr, "--listen", "127.0.0.1:0",
                                                         "--ready-file", str(ready), "--log-level", "warning"])
    deadline = time.monotonic() + 300
    while not ready.exists():
        if not proc.alive() or time.monotonic() > deadline:
            raise SystemExit(f"gateway did not start:\n{proc.log_tail()}")
        time.sleep(0.2)
    return str(json.loads(ready.read_text())["url"])


async def measure(bootstrap: str, url: str, mode: str, n: int) -> dict[str, list[float]]:
    import httpx

    unverified = mode == "unverified"
    body = {"model": "minilm-l6", "input": TEXT, "encoding_format": "base64", **({"p2p_infer": {"unverified": True}} if unverified else {})}
    out: dict[str, list[float]] = {"gateway": [], "in_process": [], "overhead": [], "in_gateway": [], "transport": [],
                                   "http_floor": []}
    async with Client([bootstrap], unverified=unverified) as client, httpx.AsyncClient(timeout=120) as http:
        for i in range(WARM_UP + n):
            started = time.perf_counter()
            reply = await http.post(f"{url}/v1/embeddings", json=body)
            data = reply.json()
            gateway_ms = (time.perf_counter() - started) * 1000
            assert reply.status_code == 200 and data["p2p_infer"]["verified"] is (not unverified), data
            started = time.perf_counter()
            result = await client.run("minilm-l6", TEXT)
            local_ms = (time.perf_counter() - started) * 1000
            assert result.verified is (not unverified)
            started = time.perf_counter()
            assert (await http.get(f"{url}/health")).status_code in (200, 503)
            floor_ms = (time.perf_counter() - started) * 1000
            if i >= WARM_UP:
                app_ms = float(reply.headers["server-timing"].split("dur=")[1])
                out["gateway"].append(gateway_ms)
                out["in_process"].append(local_ms)
                out["overhead"].append(gateway_ms - data["p2p_infer"]["total_ms"])
                out["in_gateway"].append(app_ms - data["p2p_infer"]["total_ms"])
                out["transport"].append(gateway_ms - app_ms)
                out["http_floor"].append(floor_ms)
    return out


def report(mode: str, n: int, runs: dict[str, list[float]]) -> dict:
    table = {k: stats(v) for k, v in runs.items()}
    diff = {k: round(table["gateway"][k] - table["in_process"][k], 2) for k in ("median", "mean", "p95")}
    ratio = {k: round(table["gateway"][k] / table["in_process"][k], 3) for k in ("median", "mean", "p95")}
    return {"mode": mode, "requests": n, "ms": {"gateway": table["gateway"], "in_process": table["in_process"]},
            "gateway_minus_in_process_ms": diff, "ratio": ratio, "overhead_ms": table["overhead"],
            "in_gateway_ms": table["in_gateway"], "transport_ms": table["transport"], "http_floor_ms": table["http_floor"],
            "targets_met": {"gateway_median_le_in_process_plus_5ms": diff["median"] <= 5.0}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--modes", nargs="+", default=["unverified", "committee"], choices=["unverified", "committee"])
    args = parser.parse_args()
    quiet_libp2p_logging()
    configure_logging("console", "warning")  # the in-process client's log lines go to stderr, not among the figures
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps({"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=300) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([["minilm-l6:1-5"]] * 3)
        swarm.wait_discoverable(timeout=120)
        url = start_gateway(swarm)
        for mode in args.modes:
            runs = trio.run(measure, swarm.bootstrap.addr, url, mode, args.requests)
            print(json.dumps(report(mode, args.requests, runs)), flush=True)
    print(json.dumps({"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}), file=sys.stderr)


if __name__ == "__main__":
    main()
