"""Generation latency: SmolLM2-135M decode over 3 peers (layers 1-10 / 11-20 / 21-29; the
client runs the embedding, layer 0 and the head), forwarded (peer to peer) and client-driven,
vs the same weights decoding in this process with a KV cache; 32-token prefill; RSS/PSS per
peer; failover recovery (forwarded mode).

    .venv/bin/python bench/generation_latency.py [--tokens 32] [--runs 3] [--threads 1] [--no-failover]
    .venv/bin/python bench/generation_latency.py --verified [--runs 3]   # verified vs unverified wall time, 2 providers per span

Every process uses the same torch thread count (peers: --torch-threads default 1; this
process: --threads). The monolithic baseline runs while the swarm is up, interleaved with
the distributed runs (monolithic, forwarded, client-driven, per round), so all three see the
same machine load. Decode figures exclude the first token (the prefill). Prints one JSON
summary with ratios from this run.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_infer.ml.models import load_model  # noqa: E402
from p2p_infer.ml.smollm2 import KVCache  # noqa: E402
from p2p_infer.net.host import quiet_libp2p_logging  # noqa: E402
from p2p_infer.node.client import Client  # noqa: E402
from p2p_infer.testing.harness import Swarm  # noqa: E402

SPANS = [["smollm2-135m:1-10"], ["smollm2-135m:11-20"], ["smollm2-135m:21-29"]]
MODES = ("monolithic", "forwarded", "client-driven")
PETALS = {"decode_ms": 86.7, "decode_mono_ms": 38.2, "decode_ratio": 2.27, "prefill32_ms": 238, "prefill32_mono_ms": 83,
          "prefill_ratio": 2.86, "pss_mb_per_server": 850}


def prompt_of_32_tokens(model) -> str:
    words = ("peers share the work of running one language model so that no single machine holds all of it and "
             "none of them sees the words the client typed or the answer it reads").split()
    text = ""
    for w in words * 3:
        candidate = (text + " " + w).strip()
        if len(model.prompt_ids(candidate, chat=False)) > 32:
            break
        text = candidate
    assert len(model.prompt_ids(text, chat=False)) == 32, len(model.prompt_ids(text, chat=False))
    return text


def ratios(xs: list[float], base: list[float]) -> dict[str, float]:
    a, b = stats(xs), stats(base)
    return {k: round(a[k] / b[k], 2) for k in ("median", "mean", "p95")}


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median": round(statistics.median(s), 2), "mean": round(statistics.fmean(s), 2),
            "p95": round(s[min(len(s) - 1, int(0.95 * len(s)))], 2), "n": len(s)}


@torch.inference_mode()
def monolithic(model, ids: list[int], tokens: int) -> tuple[float, list[float]]:
    """Prefill ms and decode ms per token, all 30 layers in this process, one KV cache, greedy."""
    cache = KVCache()
    t = time.perf_counter()
    h = model.run_span(model.embed_ids(ids), 0, 29, cache)
    token = int(model.logits(h).argmax())
    prefill = (time.perf_counter() - t) * 1000
    decode = []
    for _ in range(tokens - 1):
        t = time.perf_counter()
        h = model.run_span(model.embed_ids([token]), 0, 29, cache)
        token = int(model.logits(h).argmax())
        decode.append((time.perf_counter() - t) * 1000)
    return prefill, decode


async def distributed(bootstrap: str, model, prompt: str, tokens: int, runs: int) -> dict[str, dict[str, list[float]]]:
    """Per mode (monolithic, forwarded, client-driven): prefill ms and decode ms per token, rounds interleaved."""
    ids = model.prompt_ids(prompt, chat=False)
    out: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "decode": []} for m in MODES}
    outputs: dict[str, list[int]] = {}
    async with Client([bootstrap], trial=False, request_timeout=120) as c:
        for run in range(runs + 1):  # the first round warms up (client model load, connections)
            for mode in MODES:
                if mode == "monolithic":
                    prefill, decode = monolithic(model, ids, tokens)
                else:
                    pieces = [p async for p in c.generate(prompt, max_new_tokens=tokens, verified=False, chat=False,
                                                          forwarding=mode == "forwarded")]
                    result = pieces[-1].result
                    assert result.forwarded_tokens == (len(result.tokens) if mode == "forwarded" else 0), result.forwarded_tokens
                    prefill, decode = result.token_ms[0], result.token_ms[1:]
                    outputs[mode] = result.tokens
                if run:
                    out[mode]["prefill"].append(prefill)
                    out[mode]["decode"] += decode
    assert outputs["forwarded"] == outputs["client-driven"]
    out["sample"] = outputs["forwarded"]  # type: ignore[assignment]
    return out


async def failover(swarm: Swarm, prompt: str, tokens: int) -> dict[str, float]:
    names = {p.peer_id: p.name for p in swarm.peers.values() if p.info}
    async with Client([swarm.bootstrap.addr], trial=False, request_timeout=120) as c:
        [p async for p in c.generate(prompt, max_new_tokens=4, verified=False, chat=False)]  # warm
        pieces, killed_at = [], None
        async for piece in c.generate(prompt, max_new_tokens=tokens, verified=False, chat=False, forwarding=True):
            pieces.append(piece)
            if piece.index == tokens // 2 and piece.result is None and killed_at is None:
                swarm.kill(names[piece.route[1]], signal.SIGKILL)
                killed_at = piece.index
    ms = pieces[-1].result.token_ms
    normal = statistics.median(ms[1:killed_at + 1])
    return {"recovery_token_ms": round(ms[killed_at + 1], 1), "normal_token_ms": round(normal, 1),
            "recovery_extra_ms": round(ms[killed_at + 1] - normal, 1), "failovers": len(pieces[-1].result.failovers)}


async def verified_cost(bootstrap: str, prompt: str, tokens: int, runs: int) -> dict[str, object]:
    """Wall time of whole generations, verified (the default) vs unverified, alternating."""
    walls: dict[bool, list[float]] = {True: [], False: []}
    verify_ms: list[float] = []
    async with Client([bootstrap], trial=False, request_timeout=120) as c:
        for run in range(runs + 1):
            for verified in (False, True):
                t = time.perf_counter()
                pieces = [p async for p in c.generate(prompt, max_new_tokens=tokens, verified=verified, chat=False)]
                if run:  # the first round warms up
                    walls[verified].append((time.perf_counter() - t) * 1000)
                    if verified:
                        verify_ms.append(pieces[-1].result.verification["verify_ms"])
                        assert pieces[-1].result.verified
    return {"unverified_ms": stats(walls[False]), "verified_ms": stats(walls[True]), "verify_step_ms": stats(verify_ms),
            "verified_ratio_median": round(statistics.median(walls[True]) / statistics.median(walls[False]), 2)}


def run_verified(args: argparse.Namespace, prompt: str) -> None:
    with Swarm(Path(tempfile.mkdtemp(prefix="genbench-v-"))) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(SPANS + SPANS, timeout=900)
        swarm.wait_discoverable(timeout=180)
        out = trio.run(verified_cost, swarm.bootstrap.addr, prompt, args.tokens, args.runs)
    print(json.dumps({"tokens": args.tokens, "runs": args.runs, "peers": "2 per span (1-10, 11-20, 21-29)", **out}))


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["pss_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--verified", action="store_true", help="only: verified vs unverified wall time (6 peers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libp2p_logging()
    model = load_model("smollm2-135m")
    prompt = prompt_of_32_tokens(model)
    if args.verified:
        return run_verified(args, prompt)
    ids = model.prompt_ids(prompt, chat=False)
    monolithic(model, ids, 4)  # warm-up
    with Swarm(Path(tempfile.mkdtemp(prefix="genbench-"))) as swarm:
        swarm.start_bootstrap()
        peers = swarm.start_peers(SPANS, timeout=600)
        if not args.no_failover:
            swarm.start_peer("spare", ["smollm2-135m:11-20"], wait=False)
            swarm.wait_ready([swarm.peers["spare"]], timeout=600)
        swarm.wait_discoverable(timeout=180)
        memory = {p.serve[0]: memory_mb(p.proc.pid) for p in peers}
        runs = trio.run(distributed, swarm.bootstrap.addr, model, prompt, args.tokens, args.runs)
        recovery = None if args.no_failover else trio.run(failover, swarm, prompt, args.tokens)
    tokens = runs.pop("sample")
    mono = runs["monolithic"]
    summary = {
        "tokens": args.tokens, "prompt_tokens": len(ids), "threads": args.threads, "runs": args.runs,
        "decode_ms": {m: stats(runs[m]["decode"]) for m in MODES},
        "prefill32_ms": {m: stats(runs[m]["prefill"]) for m in MODES},
        "decode_ratio": {m: ratios(runs[m]["decode"], mono["decode"]) for m in MODES[1:]},
        "prefill_ratio": {m: ratios(runs[m]["prefill"], mono["prefill"]) for m in MODES[1:]},
        "peer_memory": memory, "failover_forwarded": recovery, "petals_anchor": PETALS,
        "sample": model.tokenizer.decode(tokens, skip_special_tokens=True)[:80],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
