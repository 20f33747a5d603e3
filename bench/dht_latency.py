"""DHT benchmark: provider lookup and record get/put latency with N peers in separate
processes, time until a new peer is discoverable, memory per peer.

    .venv/bin/python bench/dht_latency.py [--sizes 10 20] [--rounds 3]

Prints one JSON object per size. Peers serve digits-mlp shards (so records and provider
keys look like the real thing); the measuring client is a light client in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import trio
from libp2p.tools.anyio_service import background_trio_service

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.net.dht import Discovery  # noqa: E402
from p2p_infer.net.directory import Directory  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402
from p2p_infer.net.host import full_addrs, parse_peer_addr, quiet_libp2p_logging, running_host  # noqa: E402
from p2p_infer.identity import Identity  # noqa: E402
from p2p_infer.ml.models import known_manifests, manifest_for  # noqa: E402
from p2p_infer.proto.records import ShardSpec, make_record, record_key, shard_key, sign_record  # noqa: E402

SHARDS = ["digits-mlp:1-1", "digits-mlp:2-2", "digits-mlp:3-3", "digits-mlp:1-2", "digits-mlp:2-3"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 2), "p95_ms": round(pct(values, 0.95), 2), "n": len(values)}


def rss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.append((proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))) / 2**20)
        except psutil.NoSuchProcess:
            pass
    return out


async def measure(swarm: Swarm, n: int, rounds: int) -> dict[str, object]:
    digits = manifest_for("digits-mlp").model_id
    peers = swarm.serving()
    async with running_host(Identity.generate()) as host:
        discovery = Discovery(host, server=False, bootstrap=[parse_peer_addr(swarm.bootstrap.addr)])
        async with background_trio_service(discovery.kad):
            await discovery.join()
            directory = Directory(discovery, known_manifests())
            await directory.refresh([digits])
            provider_ms, get_ms, put_ms, full_put_ms, view_us = [], [], [], [], []
            keys = [shard_key(ShardSpec(digits, *map(int, s.split(":")[1].split("-")))) for s in SHARDS]
            me = Identity.generate()
            for _ in range(rounds):
                for key in keys:
                    t = time.perf_counter()
                    found = await discovery.find_providers(key)
                    provider_ms.append((time.perf_counter() - t) * 1000)
                    assert found, "provider lookup found nothing"
                for p in peers:
                    t = time.perf_counter()
                    record = await discovery.get_record(p.peer_id)
                    get_ms.append((time.perf_counter() - t) * 1000)
                    assert record is not None, f"no record for {p.name}"
                for _ in range(5):
                    record = make_record(me, addrs=full_addrs(host), ttl_ms=60_000)
                    t = time.perf_counter()
                    stored = await discovery.put_record(me.peer_id, sign_record(record, me), thorough=False)
                    put_ms.append((time.perf_counter() - t) * 1000)
                    assert stored > 0, "fast put stored nowhere"
                    t = time.perf_counter()
                    await discovery.kad.put_value(record_key(me.peer_id), sign_record(record, me))
                    full_put_ms.append((time.perf_counter() - t) * 1000)
                for _ in range(100):
                    t = time.perf_counter()
                    directory.shards_of(digits)
                    view_us.append((time.perf_counter() - t) * 1e6)
            # time until a new peer is discoverable by this client
            spawned = time.monotonic()
            newcomer = swarm.start_peer(f"newcomer{n}", ["digits-mlp:1-3"], wait=False)
            while newcomer.info is None:
                await trio.sleep(0.05)
                if newcomer.ready_file.exists():
                    swarm.wait_ready([newcomer])
            ready_at = time.monotonic()
            while await discovery.get_record(newcomer.peer_id) is None:
                await trio.sleep(0.05)
            listed_at = time.monotonic()
    memory = rss_mb([p.proc.pid for p in swarm.serving()])
    return {
        "peers": n,
        "provider_lookup": summary(provider_ms),
        "record_get_fresh": summary(get_ms),
        "record_put_fast": summary(put_ms),
        "record_put_iterative": summary(full_put_ms),
        "directory_view_lookup_us": round(statistics.median(view_us), 2),
        "new_peer_spawn_to_discoverable_s": round(listed_at - spawned, 2),
        "new_peer_ready_to_discoverable_s": round(listed_at - ready_at, 3),
        "rss_per_peer_mb": round(statistics.mean(memory), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quiet_libp2p_logging()
    known_manifests()  # train/cache the digits model before peers start
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp, Swarm(Path(tmp), record_ttl=120) as swarm:
            swarm.start_bootstrap()
            started = time.monotonic()
            swarm.start_peers([[SHARDS[i % len(SHARDS)]] for i in range(n)], timeout=600)
            swarm.wait_discoverable(timeout=300)
            result = trio.run(measure, swarm, n, args.rounds)
            result["swarm_start_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
