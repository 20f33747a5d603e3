"""The light client: joins without serving, keeps raw input and output local, routes the
middle layers through peers, and fails over when a peer dies.

    async with Client(bootstrap=["/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo..."]) as client:
        result = await client.embed("a sentence")
        print(result.output["embedding"][:4], result.route)

The client runs the model's ``embed`` stage and its first ``local_layers`` layers itself,
and ``finish`` (pooling / head) itself: only hidden states cross the network. How the rest
runs is a :class:`~p2p_infer.proto.plan.QueryPlan` (``plan=``, or built from the mode
keywords), validated before anything is sent. The query logic is the sans-IO
:class:`~p2p_infer.proto.query.QueryMachine`; ``query_driver`` carries out its actions.
Committee stages run in ``committee_client``.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import trio
from libp2p.abc import IHost
from libp2p.tools.anyio_service import background_trio_service

from ..clock import now_ms
from ..config import default_cache_dir
from ..errors import BatchTooLarge, CannotVerify, NoRoute, P2PInferError, PeerUnreachable, UnsupportedMode, UsageError
from ..identity import Identity
from ..logs import silence_last_resort
from ..ml.models import Activation, SplitModel, known_manifests, load_model
from ..ml.tensors import decode_tensor, encode_optional, encode_tensor
from ..net.dht import Discovery
from ..net.directory import Directory
from ..net.gossip import Gossip, running_gossip
from ..net.host import add_handler, parse_peer_addr, running_host
from ..net.streams import StreamPool, sync_lookup
from ..proto.audit import AuditLog
from ..proto.auditor import Auditor, evidence_message
from ..proto.committee_round import QuorumLatency
from ..proto.plan import QueryPlan
from ..proto.query import QueryMachine
from ..proto.reputation import Reputation
from ..proto.tensors import DEFAULT_MAX_BATCH, DEFAULT_MAX_TENSOR_BYTES
from ..proto.routing import Segment, Server, ThroughputBook, plan_route
from ..proto.trial import Admission
from ..proto.wire import FORWARD_PROTOCOL, RESULT_PROTOCOL, Message
from . import committee_client, dkg, optimistic_client, trials, zk_client
from .query_driver import ForwardResults, QueryDriver
from .results import HopReport, QueryResult, stage_labels

log = structlog.get_logger("p2p_infer.client")
silence_last_resort()  # libp2p, just imported, cleared its logger's handlers: library mode stays silent


def resolve_plan(plan: QueryPlan | None, **options: Any) -> QueryPlan:
    """``plan``, or the one the mode keywords ask for; validated, so nothing is sent on an unsupported one."""
    asked = QueryPlan.from_options(**options)
    if plan is not None and asked != QueryPlan():
        raise UsageError("pass either plan= or the mode keywords (committee=, forwarding=, critical=, ...), not both")
    return (plan or asked).validate()


def embed_batch(model: SplitModel, inputs: list[Any], plan: QueryPlan) -> Activation:
    """A batch within the limits peers enforce, refused here before anything is sent."""
    if plan.check == "zk":
        raise UnsupportedMode("critical mode proves one input at a time (the shard circuits take batch 1); "
                              "send the inputs one by one")
    if not 1 <= len(inputs) <= DEFAULT_MAX_BATCH:
        raise BatchTooLarge(f"a batch takes 1 to {DEFAULT_MAX_BATCH} inputs (peers refuse more), got {len(inputs)}")
    act = model.embed_batch(inputs)
    size = act.hidden.numel() * act.hidden.element_size()
    if size > DEFAULT_MAX_TENSOR_BYTES:
        raise BatchTooLarge(f"a batch of {len(inputs)} x {list(act.hidden.shape[1:])} is {size} bytes of hidden state, "
                            f"over the {DEFAULT_MAX_TENSOR_BYTES}-byte limit of one request; send fewer or shorter inputs")
    return act


class Client:
    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        identity: Identity | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        local_layers: int = 1,
        forwarding: bool = False,
        max_retries: int = 3,
        request_timeout: float = 30.0,
        refresh_interval: float = 10.0,
        committee: int | None = None,
        commit_timeout: float = 5.0,
        max_reruns: int = 2,
        spot_check: float = 0.0,
        trial: bool = True,
        audit_log: Path | None = None,
        critical: bool = False,
        proof_follows: bool = False,
        unverified: bool = False,
        optimistic: float | None = None,
        check_rng: random.Random | None = None,
        plan: QueryPlan | None = None,
        tee_policy: Any = None,  # verify.tee.Policy: what counts as attested (default: our code, no real platform)
    ) -> None:
        self.query_plan = resolve_plan(plan, forwarding=forwarding, committee=committee, critical=critical, spot_check=spot_check,
                                       optimistic=optimistic, unverified=unverified, proof_follows=proof_follows,
                                       local_layers=local_layers, max_retries=max_retries, max_reruns=max_reruns, trial=trial)
        # read by committee_client, which runs on this client's attributes
        self.committee = self.query_plan.committee_k if self.query_plan.check == "committee" else None
        self.local_layers = self.query_plan.local_layers
        self.max_reruns = self.query_plan.max_reruns
        self.commit_timeout = commit_timeout
        self.bootstrap = [parse_peer_addr(a) for a in bootstrap]
        self.identity = identity or Identity.generate()
        self.listen = listen
        self.request_timeout = request_timeout
        self.refresh_interval = refresh_interval
        self.reputation = Reputation()
        self.auditor = Auditor(self.reputation, AuditLog(audit_log, self.identity, now_ms) if audit_log else None,
                               own_rounds_only=True)  # other clients' rounds are the peers' to audit
        self._rng = random.SystemRandom()  # request ids and spot-check draws: unguessable by peers
        self._check_rng = check_rng or self._rng  # optimistic draws (injected in tests)
        self._checks: list[Any] = []  # optimistic checks and committee judgements still running (each has wait())
        self.admission = Admission(self._rng, timeout=request_timeout)  # trial verdicts, kept across queries
        self.throughput = ThroughputBook()  # what routing ranks peers by: timed here, never taken from records
        self.results = ForwardResults()
        self.gossip: Gossip | None = None
        self._nursery: trio.Nursery | None = None
        self._followed: dict[int, tuple[Any, Activation, Activation, list[Any]]] = {}  # proofs still to collect
        self.ticket_session = committee_client.TicketSession(self.identity.public_key)  # committee tickets, per session
        self.hedges = QuorumLatency()  # how long each stage's quorum takes: the hedge delay
        self.host: IHost | None = None
        self.directory: Directory | None = None
        self.rtt_ms: dict[str, float] = {}
        self.pool: StreamPool | None = None
        self._stack: AsyncExitStack | None = None
        self._models: dict[str, SplitModel] = {}
        self.tee_policy = tee_policy
        self.threshold_key: Any = None  # enhanced privacy: the accepted DKG key (node/dkg.fetch_key)

    # ---- lifecycle ----

    async def __aenter__(self) -> Client:
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            manifests = await trio.to_thread.run_sync(known_manifests, default_cache_dir())
            self.host = await self._stack.enter_async_context(running_host(self.identity, self.listen))
            add_handler(self.host, RESULT_PROTOCOL, self.results.handle)
            # a peer not reached (or whose connection stalled) gives up its held committee ticket: drawn again once it
            # answers a ticket request (a partition healed, a peer restarted), not meanwhile, each time judged missing
            self.pool = StreamPool(self.host, sync_lookup(self._addrs_of), on_unreachable=self.ticket_session.forget)
            discovery = Discovery(self.host, server=False, bootstrap=self.bootstrap)
            await self._stack.enter_async_context(background_trio_service(discovery.kad))
            self.gossip = await self._stack.enter_async_context(running_gossip(self.host, self._on_gossip))
            if not await discovery.join():
                raise PeerUnreachable("no bootstrap peer reachable")
            self.directory = Directory(discovery, manifests, self.tee_policy)
            nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(nursery.cancel_scope.cancel)
            self._nursery = nursery
            await self.refresh()
            nursery.start_soon(self._keep_fresh)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stack is not None
        try:
            await self._wait_for_checks()
            if self.gossip is not None:
                await self.gossip.flush()  # verdicts and evidence of the last query still go out
        finally:  # also when cancelled (Ctrl-C in the sync facade): the host and the nursery close
            await self._stack.__aexit__(None, None, None)

    async def refresh(self) -> None:
        """Re-read the overlay and re-measure round trips to the peers that serve layers."""
        assert self.directory is not None
        await self.directory.refresh(list(self.directory.known_models))
        async with trio.open_nursery() as nursery:
            for record in self.directory.live():
                if record.shards:
                    nursery.start_soon(self._measure_rtt, record.peer_id)

    async def _keep_fresh(self) -> None:
        while True:
            await trio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("background refresh failed")

    # ---- public API ----

    async def embed(self, text: str | Sequence[str]) -> QueryResult:
        """One text, or a list of texts sent as one batch (``result.output["embedding"]`` then holds one per text)."""
        return await self.run("minilm-l6", text if isinstance(text, str) else list(text))

    async def classify(self, pixels: Sequence[float] | Sequence[Sequence[float]]) -> QueryResult:
        """One image's 64 pixel values, or a list of images sent as one batch."""
        array = np.asarray(pixels, dtype=np.float32)
        return await self.run("digits-mlp", array.tolist())  # 2-D: a batch of images

    def generate(self, prompt: str, **options: Any) -> AsyncIterator[Any]:
        """``async for piece in client.generate(prompt, max_new_tokens=32)``: text generation (node/generate.py)."""
        from .generate import generate

        return generate(self, prompt, **options)

    async def model(self, name: str) -> SplitModel:
        if name not in self._models:
            self._models[name] = await trio.to_thread.run_sync(load_model, name, default_cache_dir())
        return self._models[name]

    async def run(self, model_name: str, inputs: Any) -> QueryResult:
        """Run ``inputs`` through ``model_name``: the first layers and the head here, the rest as the plan says.
        A list of inputs (texts; images of 64 values) goes as one batch: one request per stage."""
        model = await self.model(model_name)
        if self.local_layers >= len(model.layers):
            raise UsageError(f"{model_name} has {len(model.layers)} layers; the client keeps {self.local_layers} locally")
        batched = model.is_batch(inputs)
        started = time.perf_counter()
        act = embed_batch(model, list(inputs), self.query_plan) if batched else model.embed(inputs)
        act = Activation(model.run_layers(act, 0, self.local_layers - 1), act.mask)
        local_ms = (time.perf_counter() - started) * 1000
        await self._admit_servers(model, act)
        live = time.perf_counter()
        if self.query_plan.privacy == "threshold":
            received, fields = await dkg.run_private(self, model, act)
        elif self.query_plan.check == "committee":
            await self._require_committees(model)  # refused before anything is sent, never run unverified
            received, fields = await self._run_committee(model, act)
        else:
            received, fields = await self._run_machine(model, act)
        self.admission.on_query_done(time.perf_counter() - live)  # later trials are spread over this long
        finish_start = time.perf_counter()
        output = model.finish_batch(received) if batched else model.finish(received)
        local_ms += (time.perf_counter() - finish_start) * 1000
        runs = fields.pop("optimistic_runs", None)
        result = QueryResult(model=model.name, model_id=model.model_id, output=output, local_ms=local_ms,
                             total_ms=(time.perf_counter() - started) * 1000, batch=int(act.hidden.shape[0]), **fields)
        result.verification = stage_labels(self.query_plan.check, self.query_plan.stage_check(), result.route, result.spot_checks,
                                           result.proofs)
        result.verified = bool(result.verification) and all(s["verified"] for s in result.verification)
        if runs is not None:  # the answer is back: only now is its check drawn
            stages = optimistic_client.stage_runs(runs, result.route, encode_optional(act.mask))
            result.check = optimistic_client.start_check(self, model, stages, self._check_rng)
            self._checks.append(result.check)
        self._checks = [c for c in self._checks if not c.done]
        return result

    async def _require_committees(self, model: SplitModel) -> None:
        """Every stage of the route needs ``k`` providers (trusted, past their trial); refresh once if one is short."""
        k = self.query_plan.committee_k or 0
        for attempt in range(2):
            segments = await self._plan_or_refresh(model, self.local_layers, ())
            servers = self.servers(model)
            short = [(s, [x.peer_id for x in servers if x.first <= s.first and s.last <= x.last]) for s in segments]
            short = [(s, found) for s, found in short if len(found) < k]
            if not short:
                return
            if attempt == 0:
                await self.refresh()  # maybe providers joined since the last refresh
        segment, found = short[0]
        names = f": {', '.join(p[:16] + '...' for p in found)}" if found else ""
        raise CannotVerify(f"cannot verify {model.name} layers {segment.first}-{segment.last}: found {len(found)} provider(s) "
                           f"(trusted, past their trial){names}; a committee of {k} needs {k}. Add providers, or ask for an "
                           "unverified answer explicitly (--unverified, unverified=True)")

    async def _wait_for_checks(self) -> None:
        """Optimistic checks still running finish before the client closes (bounded)."""
        with trio.move_on_after(3 * self.request_timeout):
            for pending in self._checks:
                await pending.wait()

    async def _run_committee(self, model: SplitModel, act: Activation) -> tuple[Activation, dict[str, Any]]:
        received, hops, stages, cert, judged = await committee_client.run_committees(self, model, act)
        return received, {"route": hops, "mode": f"committee k={self.committee}", "stages": stages, "certificate": cert,
                          "judged": judged}

    async def _run_machine(self, model: SplitModel, act: Activation) -> tuple[Activation, dict[str, Any]]:
        """Hop by hop, forwarding, spot-checked or proven: the query machine decides, the driver does the I/O."""
        machine = QueryMachine(self.query_plan, model.name, len(model.layers), encode_tensor(act.hidden), self.servers(model),
                               self._rng, mask=encode_optional(act.mask), reputation=self.reputation.of,
                               min_reputation=self.reputation.threshold, timeout=self.request_timeout)
        done = await QueryDriver(self, model).drive(machine)
        received = Activation(decode_tensor(done.output, field="output"), act.mask)
        route = [HopReport(h.peer_id, h.first, h.last, h.compute_ms, h.queue_ms, h.round_trip_ms) for h in done.hops]
        optimistic = self.query_plan.check == "optimistic"
        return received, {"route": route, "mode": done.mode, "retries": len(done.failed), "failed_peers": list(done.failed),
                          "spot_checks": list(done.spot_checks),
                          "proofs": None if optimistic else await self._proof_report(model, act, received, list(done.evidence)),
                          **({"optimistic_runs": list(done.evidence)} if optimistic else {})}

    async def _proof_report(self, model: SplitModel, sent: Activation, received: Activation, evidence: list[Any]) -> dict[str, Any] | None:
        """zk: verify the proofs and their chain now, or (proofs follow) keep them for verify_followed()."""
        if self.query_plan.check != "zk":
            return None
        if not self.query_plan.proof_follows:
            return await zk_client.check_proofs(self, model, sent, received, evidence)
        report: dict[str, Any] = {"verified": None, "pending": len(evidence)}
        self._followed[id(report)] = (model, sent, received, evidence)
        return report

    # ---- routing ----

    def servers(self, model: SplitModel) -> list[Server]:
        """Servers of ``model`` this client will use: trusted, and past their trial task; ranked
        by the throughput this client measured (a record's claim can only lower an untimed peer's)."""
        assert self.directory is not None
        directory = self.directory
        shards = [(r, s) for r, s in directory.shards_of(model.model_id)
                  if self.reputation.trusted(r.peer_id) and (not self.query_plan.trial or self.admission.admitted(r.peer_id))
                  and (not self.query_plan.require_tee or directory.attested(r.peer_id) is not None)]  # TEE-only stages
        speed = self.throughput.effective({r.peer_id: r.throughput for r, _ in shards})
        return [Server(r.peer_id, s.first, s.last, speed[r.peer_id], r.load, self.rtt_ms.get(r.peer_id),
                       directory.attested(r.peer_id) is not None) for r, s in shards]

    def plan(self, model: SplitModel, first: int, exclude: Sequence[str] = ()) -> list[Segment]:
        return plan_route(self.servers(model), first, len(model.layers) - 1, exclude=exclude, reputation=self.reputation.of,
                          model_name=model.name, whole_shards=self.query_plan.check == "zk", require_tee=self.query_plan.require_tee)

    async def _plan_or_refresh(self, model: SplitModel, pos: int, exclude: Sequence[str]) -> list[Segment]:
        """For the committee driver: plan, or refresh the directory once and plan again."""
        try:
            return self.plan(model, pos, exclude)
        except NoRoute:
            await self.refresh()  # maybe a replacement joined since the last refresh
            return self.plan(model, pos, exclude)

    async def _admit_servers(self, model: SplitModel, act: Activation) -> None:
        """Trial tasks shaped like this query's hops: waited for when the query cannot route
        without an untried peer, else mixed into the live traffic (``node/trials.py``)."""
        if self.query_plan.trial and self.directory is not None:
            await trials.trials_for_query(self, model, act)

    # ---- critical mode: ZK proofs ----

    async def verify_followed(self, result: QueryResult) -> dict[str, Any]:
        """Proof-follows mode: collect the proofs of ``result`` from the peers, then verify them and the chain."""
        return await zk_client.verify_followed(self, result)

    # ---- gossip ----

    async def _on_gossip(self, sender: str, message: dict[str, Any]) -> None:
        for evidence in self.auditor.observe(sender, message):
            self._publish(evidence_message(evidence))

    def _publish(self, message: dict[str, Any]) -> None:
        if self.gossip is not None and self._nursery is not None:
            self.gossip.publish_soon(self._nursery, message)

    # ---- streams ----

    async def _measure_rtt(self, peer_id: str) -> None:
        try:
            start = time.perf_counter()
            await self._request(peer_id, {"type": "ping"}, timeout=5)
            self.rtt_ms[peer_id] = (time.perf_counter() - start) * 1000
        except P2PInferError as exc:
            log.info("peer did not answer ping", peer=peer_id, reason=exc.message)
            self.rtt_ms.pop(peer_id, None)

    async def _request(self, peer_id: str, message: Message, timeout: float | None = None) -> Message:
        assert self.pool is not None
        return await self.pool.request(peer_id, FORWARD_PROTOCOL, message, timeout=timeout or self.request_timeout)

    def _drop_stream(self, peer_id: str) -> None:
        if self.pool is not None:
            self.pool.forget(peer_id)
        self.rtt_ms.pop(peer_id, None)

    def _addrs_of(self, peer_id: str) -> list[str]:
        record = self.directory.records.get(peer_id) if self.directory else None
        return list(record.addrs) if record else []


@asynccontextmanager
async def connect(bootstrap: Sequence[str], **options: Any) -> AsyncIterator[Client]:
    async with Client(bootstrap, **options) as client:
        yield client
