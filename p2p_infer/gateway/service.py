"""The gateway's work, apart from HTTP: one long-lived light client answering OpenAI-shaped
requests, the evidence each answer carries, the recent queries and the network view the
health page shows."""

from __future__ import annotations

import base64
import copy
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import P2PInferError, VerificationFailed
from ..metrics import Metrics, Snapshot
from ..proto.plan import QueryPlan
from . import schemas

if TYPE_CHECKING:
    from ..node.client import Client

RECENT = 50  # queries kept for the health page


@dataclass
class Recent:
    """The health page's list of recent queries (newest first)."""

    items: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))

    def add(self, endpoint: str, model: str, started: float, evidence: dict[str, Any] | None, error: str | None = None) -> None:
        ev = evidence or {}
        self.items.appendleft({
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "endpoint": endpoint, "model": model,
            "ms": round((time.perf_counter() - started) * 1000, 1), "verified": ev.get("verified"), "mode": ev.get("mode"),
            "route": [f"{h['peer'][:12]}:{h['first']}-{h['last']}" for h in ev.get("route", [])], "error": error,
        })


def query_evidence(result: Any) -> dict[str, Any]:
    """What an embedding carries: how it was checked, the route, the quorum certificate."""
    return {
        "verified": result.verified, "mode": result.mode, "model_id": result.model_id,
        "verification": result.verification,
        "route": [{"peer": h.peer, "first": h.first, "last": h.last, "compute_ms": round(h.compute_ms, 2)} for h in result.route],
        "stages": result.stages,
        "certificate": None if result.certificate is None else base64.b64encode(result.certificate).decode(),
        "failed_peers": result.failed_peers, "total_ms": round(result.total_ms, 2),
    }


def generation_evidence(result: Any, seed: int) -> dict[str, Any]:
    return {"verified": result.verified, "mode": result.mode, "route": result.route, "verification": result.verification,
            "failovers": result.failovers, "seed": seed, "total_ms": round(result.total_ms, 2)}


def unverified_view(client: Client) -> Client:
    """The same client (host, directory, reputation, streams) running an explicitly
    unverified plan: a shallow copy whose plan alone differs."""
    view = copy.copy(client)
    view.query_plan = QueryPlan.from_options(unverified=True, local_layers=client.query_plan.local_layers,
                                             max_retries=client.query_plan.max_retries, trial=client.query_plan.trial).validate()
    view.committee = None
    return view


class Gateway:
    def __init__(self, client: Client, *, unverified: bool = False, rng: random.Random | None = None) -> None:
        self.client = client
        self.unverified = unverified  # the gateway flag: every answer unverified (and labelled)
        self._plain = unverified_view(client)
        self.metrics = Metrics("gateway", self._snapshot)
        self.recent = Recent()
        self.fingerprint = f"p2p-infer-{__version__}"
        self._rng = rng or random.SystemRandom()

    def _snapshot(self) -> Snapshot:
        host = self.client.host
        return Snapshot(connections=len(host.get_network().get_connections()) if host is not None else 0,
                        reputation=dict(self.client.reputation.scores))

    def _for(self, unverified: bool) -> Client:
        return self._plain if (unverified or self.unverified) else self.client

    # ---- embeddings ----

    async def embeddings(self, req: schemas.EmbeddingsRequest) -> dict[str, Any]:
        started = time.perf_counter()
        client = self._for(req.unverified)
        try:
            results = [await client.run(req.model, text) for text in req.inputs]  # one verified query per input
        except P2PInferError as exc:
            self.recent.add("embeddings", req.model, started, None, f"{exc.code}: {exc.message}")
            raise
        model = await client.model(req.model)
        tokens = sum(min(len(model.tokenizer(t)["input_ids"]), model.max_tokens) for t in req.inputs)  # type: ignore[attr-defined]
        per_input = [query_evidence(r) for r in results]
        evidence = per_input[0] if req.single else {"verified": all(e["verified"] for e in per_input),
                                                    "mode": per_input[0]["mode"], "inputs": per_input}
        if not req.single:
            evidence["route"] = per_input[0]["route"]
        self.recent.add("embeddings", req.model, started, evidence)
        return schemas.embeddings_response(req, [r.output["embedding"] for r in results], tokens, evidence)

    # ---- chat ----

    async def _prompt_ids(self, req: schemas.ChatRequest) -> str:
        model = await self.client.model(req.model)
        return str(model.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False))  # type: ignore[attr-defined]

    def _options(self, req: schemas.ChatRequest, seed: int) -> dict[str, Any]:
        from ..proto.sampling import Sampling

        sampling = Sampling(req.temperature, req.top_k, req.top_p, seed).validate()
        return {"max_new_tokens": req.max_tokens, "sampling": sampling, "verified": not (req.unverified or self.unverified),
                "chat": False}

    async def chat(self, req: schemas.ChatRequest) -> dict[str, Any]:
        started = time.perf_counter()
        seed = req.seed if req.seed is not None else self._rng.getrandbits(31)
        result = None
        try:
            async for piece in self.client.generate(await self._prompt_ids(req), **self._options(req, seed)):
                if piece.result is not None:
                    result = piece.result
        except P2PInferError as exc:
            self.recent.add("chat", req.model, started, None, f"{exc.code}: {exc.message}")
            raise
        assert result is not None
        evidence = generation_evidence(result, seed)
        self.recent.add("chat", req.model, started, evidence)
        return schemas.completion(f"chatcmpl-{self._rng.getrandbits(96):024x}", int(time.time()), req.model, result.text,
                                  await self._finish(req, result), schemas.usage(result.prompt_tokens, len(result.tokens)),
                                  evidence, self.fingerprint)

    async def _finish(self, req: schemas.ChatRequest, result: Any) -> str:
        """OpenAI's finish_reason: "stop" at an end-of-sequence token, else "length"."""
        eos = (await self.client.model(req.model)).eos_ids()  # type: ignore[attr-defined]
        return "stop" if result.tokens and result.tokens[-1] in eos else "length"

    async def chat_stream(self, req: schemas.ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """The chunks OpenAI streams: the role, one per token, the finish (with the evidence),
        usage if asked. Tokens are provisional until the last chunk's ``p2p_infer.verified``; if
        verification catches a liar after tokens went out, the stream ends in an error."""
        started = time.perf_counter()
        seed = req.seed if req.seed is not None else self._rng.getrandbits(31)
        cid, created = f"chatcmpl-{self._rng.getrandbits(96):024x}", int(time.time())

        def make(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return schemas.chunk(cid, created, req.model, self.fingerprint, delta, finish, **extra)

        yield make({"role": "assistant", "content": ""})
        try:
            async for piece in self.client.generate(await self._prompt_ids(req), **self._options(req, seed)):
                if piece.restart:
                    raise VerificationFailed("verification caught a lying peer after tokens were streamed: the streamed text "
                                             "is void; ask again (or without stream for a verified answer in one piece)")
                if piece.result is not None:
                    evidence = generation_evidence(piece.result, seed)
                    self.recent.add("chat", req.model, started, evidence)
                    yield make({}, await self._finish(req, piece.result), p2p_infer=evidence)
                    if req.include_usage:
                        yield make(None, usage=schemas.usage(piece.result.prompt_tokens, len(piece.result.tokens)))
                elif piece.text:
                    yield make({"content": piece.text})
        except P2PInferError as exc:
            self.recent.add("chat", req.model, started, None, f"{exc.code}: {exc.message}")
            raise

    # ---- what the health page and /v1/models show ----

    def network(self) -> dict[str, Any]:
        """Peers, coverage per model and layer, reputation, as this gateway's client sees them."""
        directory = self.client.directory
        assert directory is not None
        names = {mid: m.name for mid, m in directory.manifests.items()}
        peers = []
        for r in sorted(directory.live(), key=lambda r: r.peer_id):
            peers.append({"peer_id": r.peer_id, "shards": [{"model": names.get(s.model_id, s.model_id), "first": s.first,
                                                             "last": s.last} for s in r.shards],
                          "reputation": round(self.client.reputation.of(r.peer_id), 4), "load": r.load,
                          "rtt_ms": None if r.peer_id not in self.client.rtt_ms else round(self.client.rtt_ms[r.peer_id], 2),
                          "tee": r.tee, "software": r.software})
        return {"peers": peers, "coverage": self.coverage(), "recent": list(self.recent.items)}

    def coverage(self) -> dict[str, Any]:
        """Per served model: providers of each layer the client does not run itself."""
        directory = self.client.directory
        assert directory is not None
        out: dict[str, Any] = {}
        for mid, manifest in directory.manifests.items():
            if manifest.name not in (schemas.EMBEDDING_MODEL, schemas.CHAT_MODEL):
                continue
            local = self.client.query_plan.local_layers
            layers = [{"layer": i, "providers": sorted({r.peer_id for r, s in directory.shards_of(mid) if s.first <= i <= s.last
                                                        and self.client.reputation.trusted(r.peer_id)})}
                      for i in range(local, manifest.num_layers)]
            need = 2 if manifest.name == schemas.CHAT_MODEL else (self.client.query_plan.committee_k or 3)
            out[manifest.name] = {"model_id": mid, "layers": manifest.num_layers, "client_layers": local,
                                  "coverage": layers, "min_providers": min(len(x["providers"]) for x in layers),
                                  "needed_for_verification": need}
        return out

    def models(self) -> dict[str, Any]:
        cov = self.coverage()
        kinds = {schemas.EMBEDDING_MODEL: "embeddings", schemas.CHAT_MODEL: "chat.completions"}
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "p2p-infer",
             "p2p_infer": {"kind": kinds[name], **({k: v for k, v in cov[name].items() if k != "coverage"} if name in cov else
                                                   {"min_providers": 0})}}
            for name in kinds]}

    def health(self) -> tuple[int, dict[str, Any]]:
        """200 when every served model is covered by enough providers to verify, else 503 and why."""
        cov = self.coverage()
        models = {name: {"min_providers": c["min_providers"], "needed_for_verification": c["needed_for_verification"],
                         "verifiable": c["min_providers"] >= c["needed_for_verification"]} for name, c in cov.items()}
        live = len(self.client.directory.live()) if self.client.directory is not None else 0
        ok = live > 0 and len(models) == 2 and all(m["verifiable"] for m in models.values())
        return (200 if ok else 503), {"status": "ok" if ok else "degraded", "peers": live, "models": models,
                                      "uptime_s": round(self.metrics.uptime_s(), 1), "version": __version__}

