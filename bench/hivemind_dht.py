#!/usr/bin/env python3
"""External-comparison baseline: hivemind.DHT on one machine, loopback only.

For each N in NS:
  * start N DHT nodes, each in its own OS process (hivemind.DHT is a
    multiprocessing ForkProcess; each one also spawns its own go-libp2p
    `p2pd` daemon). Node 0 starts alone, nodes 1..N-1 bootstrap from node 0's
    visible multiaddrs; every node listens on /ip4/127.0.0.1/tcp/0.
  * node i stores "peer/<i>" (expiration now+60 s) from its own process.
  * a separate client node (client_mode=True, bootstrapped from node 0)
    measures get(key, latest=True) for every node's key, ROUNDS rounds in a
    fixed order, and store() latency of STORE_OPS fresh keys.
  * time until a new node is discoverable: start one extra node, store its
    key from it, and poll the client's get(latest=True) until the value is
    returned; the clock starts just before the DHT constructor.
  * memory per node: RSS (psutil) of each node's python process plus its
    p2pd child(ren); PSS/USS are reported too because forked children share
    copy-on-write pages with the parent, which inflates plain RSS.
  * one JSON line per N on stdout; everything is shut down afterwards.

Every blocking call has a timeout (MPFuture.result(timeout=...)), and the
whole run is guarded by a SIGALRM watchdog. Usage:
    venv/bin/python hivemind_dht.py [--ns 10,20] [--rounds 3]
"""
import argparse
import json
import os
import signal
import statistics
import sys
import time

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import psutil  # noqa: E402
import hivemind  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

HOST_MADDRS = ["/ip4/127.0.0.1/tcp/0"]
OP_TIMEOUT = 15.0          # seconds, per get/store call
START_TIMEOUT = 60.0       # seconds, per DHT constructor (await_ready)
DISCOVERY_TIMEOUT = 30.0   # seconds, polling for the extra node's key
POLL_INTERVAL = 0.01       # seconds between polls (plus the get itself)
TTL = 60.0                 # seconds, expiration = now + TTL
WATCHDOG = 600             # seconds, whole script


def pct(xs, q):
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary(xs_ms):
    return {
        "n": len(xs_ms),
        "median_ms": round(statistics.median(xs_ms), 3),
        "p95_ms": round(pct(xs_ms, 95), 3),
        "min_ms": round(min(xs_ms), 3),
        "max_ms": round(max(xs_ms), 3),
    }


def start_dht(initial_peers=None, client_mode=False):
    dht = hivemind.DHT(
        initial_peers=initial_peers,
        host_maddrs=HOST_MADDRS,
        client_mode=client_mode,
        start=False,
    )
    dht.start()  # forks the node's own process, which launches its p2pd
    dht.wait_until_ready(timeout=START_TIMEOUT)
    return dht


def node_memory(pid):
    """(rss, pss, uss, nprocs) in bytes for a DHT process and its descendants."""
    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    rss = pss = uss = 0
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", 0)
            uss += full.uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            rss += p.memory_info().rss
    return rss, pss, uss, len(procs), sorted(p.name() for p in procs)


def timed_get(client, key):
    t0 = time.perf_counter()
    res = client.get(key, latest=True, return_future=True).result(timeout=OP_TIMEOUT)
    return (time.perf_counter() - t0) * 1e3, res


def run_one(n, rounds, store_ops):
    nodes = []
    client = None
    extra = None
    out = {"impl": "hivemind", "hivemind_version": hivemind.__version__, "n": n}
    try:
        # ---- start N nodes, each its own process (+ its own p2pd) ----
        t0 = time.perf_counter()
        nodes.append(start_dht())
        boot = [str(m) for m in nodes[0].get_visible_maddrs()]
        for _ in range(1, n):
            nodes.append(start_dht(initial_peers=boot))
        out["startup_all_s"] = round(time.perf_counter() - t0, 3)
        pids = [d.pid for d in nodes]
        assert len(set(pids)) == n and os.getpid() not in pids, "nodes must be distinct processes"

        # ---- each node stores its own key from its own process ----
        t0 = time.perf_counter()
        futs = [d.store(f"peer/{i}", f"value-{i}", get_dht_time() + TTL, return_future=True)
                for i, d in enumerate(nodes)]
        ok = [f.result(timeout=OP_TIMEOUT) for f in futs]
        out["node_store_ok"] = sum(bool(x) for x in ok)
        out["node_store_all_s"] = round(time.perf_counter() - t0, 3)

        # ---- client node ----
        client = start_dht(initial_peers=boot, client_mode=True)

        # get(latest=True) over all keys, fixed order, `rounds` rounds
        get_ms, first_round_ms, misses = [], [], 0
        for r in range(rounds):
            for i in range(n):
                ms, res = timed_get(client, f"peer/{i}")
                if res is None or res.value != f"value-{i}":
                    misses += 1
                get_ms.append(ms)
                if r == 0:
                    first_round_ms.append(ms)
        out["get_latest"] = summary(get_ms)
        out["get_latest_round1_median_ms"] = round(statistics.median(first_round_ms), 3)
        out["get_misses"] = misses

        # store latency from the client (fresh keys, fixed order)
        store_ms, store_fail = [], 0
        for j in range(store_ops):
            t0 = time.perf_counter()
            ok = client.store(f"client/{j}", f"cv-{j}", get_dht_time() + TTL,
                              return_future=True).result(timeout=OP_TIMEOUT)
            store_ms.append((time.perf_counter() - t0) * 1e3)
            store_fail += 0 if ok else 1
        out["client_store"] = summary(store_ms)
        out["client_store_failures"] = store_fail

        # ---- memory per node (before the extra node joins) ----
        mem = [node_memory(pid) for pid in pids]
        out["procs_per_node"] = sorted(set(m[3] for m in mem))
        out["proc_names_node0"] = mem[0][4]
        out["rss_mb_per_node_mean"] = round(statistics.mean(m[0] for m in mem) / 2**20, 1)
        out["pss_mb_per_node_mean"] = round(statistics.mean(m[1] for m in mem) / 2**20, 1)
        out["uss_mb_per_node_mean"] = round(statistics.mean(m[2] for m in mem) / 2**20, 1)
        p2pd_rss = [p.memory_info().rss for pid in pids
                    for p in psutil.Process(pid).children(recursive=True) if p.name() == "p2pd"]
        out["p2pd_rss_mb_mean"] = round(statistics.mean(p2pd_rss) / 2**20, 1) if p2pd_rss else None
        out["parent_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)

        # ---- time until a new node is discoverable ----
        key = f"peer/{n}"
        t0 = time.perf_counter()
        extra = start_dht(initial_peers=boot)
        t_ctor = time.perf_counter()
        stored = extra.store(key, f"value-{n}", get_dht_time() + TTL,
                             return_future=True).result(timeout=OP_TIMEOUT)
        t_store = time.perf_counter()
        polls, found = 0, False
        while time.perf_counter() - t0 < DISCOVERY_TIMEOUT:
            polls += 1
            _, res = timed_get(client, key)
            if res is not None and res.value == f"value-{n}":
                found = True
                break
            time.sleep(POLL_INTERVAL)
        t_found = time.perf_counter()
        out["discover"] = {
            "found": found,
            "store_ok": bool(stored),
            "total_ms": round((t_found - t0) * 1e3, 3) if found else None,
            "constructor_ms": round((t_ctor - t0) * 1e3, 3),
            "store_ms": round((t_store - t_ctor) * 1e3, 3),
            "polls": polls,
        }
    finally:
        for d in [extra, client] + nodes[::-1]:
            if d is not None:
                try:
                    d.shutdown()
                except Exception as e:  # keep shutting the rest down
                    print(f"shutdown error: {e!r}", file=sys.stderr)
        reap()
    return out


def reap():
    """Kill any descendant left behind (p2pd daemons, DHT processes)."""
    kids = psutil.Process().children(recursive=True)
    kids = [k for k in kids if k.name() != "torch_shm_manager"]
    for k in kids:
        try:
            k.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(kids, timeout=5)
    for k in alive:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="10,20")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store-ops", type=int, default=30)
    args = ap.parse_args()

    def on_alarm(signum, frame):
        raise TimeoutError("watchdog: benchmark exceeded %d s" % WATCHDOG)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(WATCHDOG)
    try:
        for n in [int(x) for x in args.ns.split(",")]:
            print(json.dumps(run_one(n, args.rounds, args.store_ops)), flush=True)
    finally:
        signal.alarm(0)
        reap()


if __name__ == "__main__":
    main()
