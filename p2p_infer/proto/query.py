"""One query through the overlay as a state machine: events in, actions out. Sans-IO.

In the style of rust-libp2p's ``ClosestPeersIter`` and h11's ``Connection``: the driver
(``node/client.py``) feeds :class:`QueryMachine` events (``start``, ``on_reply``,
``on_failure``, ``on_accepted``, ``on_servers``, ``on_arbitration``, ``poll``) and carries
out the actions they return: send an activation for layers a-b to a peer by a deadline
(:class:`SendHop`), send a forwarding request with its route (:class:`SendForward`), wait
for a forwarded result (:class:`AwaitResult`), refresh the directory and call back with
the servers (:class:`RefreshDirectory`), run a stage on the client's own weights to settle
a spot check (:class:`Arbitrate`), record a reputation outcome (:class:`Record`), forget a
failed peer's stream (:class:`Forget`), and finally :class:`Done` or :class:`Failed`.

The machine never sends and never reads the clock: ``now`` comes with every event (seconds
on any monotonic clock), randomness only from the ``rng`` it is given, so tests drive it on
virtual time with no network. Activations are wire tensors (``proto/tensors.py``),
compared with ``consensus.outputs_agree``; proofs and proof tokens are opaque
``evidence``. The attention mask never changes along a route: every send carries it as given.

Failover: a failed hop's peer is excluded and the layers still to run are re-routed from
the last good activation, up to ``plan.max_retries`` failed hops; then :class:`NoRoute`
names the model. In forwarding mode any failure falls back to hop-by-hop from the start.
Whether a failure is worth another provider is the error class's ``retryable`` flag
(:func:`is_retryable`), never a list of code strings.

Extension point, generation sessions (KV cache, the next issue): a session pins, per
stage, the peer that holds its cache. It is a second machine over the same pieces: route
planning (:meth:`QueryMachine._route_from`), exclusion and bounded retries
(:meth:`QueryMachine._fail_over`), and these actions, with a session id added to
:class:`SendHop` (``ForwardRequest.session`` is already on the wire). On failover it replays
the session's prefix to the replacement before sending the next token.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import NoRoute, P2PInferError, RemoteError, UnsupportedMode, UsageError
from .consensus import outputs_agree
from .plan import QueryPlan
from .routing import Segment, Server, plan_route
from .tensors import WireTensor

Purpose = Literal["hop", "check", "forward", "trial"]


def is_retryable(exc: BaseException) -> bool:
    """Whether another provider (or a later attempt) may succeed: the error class says."""
    return bool(getattr(exc, "retryable", False))


@dataclass(frozen=True)
class HopFailure:
    """Why a request to a peer brought no usable answer."""

    reason: str
    retryable: bool = True
    faulty: bool = False  # it answered, wrongly: penalised as well as avoided
    peer: str = ""  # who failed, when not the peer asked (forwarding: a hop further on)
    error: Exception | None = None  # raised as is when the query cannot go on

    @classmethod
    def from_error(cls, exc: Exception, *, peer: str = "") -> HopFailure:
        """An error reply goes by its class's flag (``bad_request`` would fail anywhere);
        anything else a request raises means this peer or the path to it broke
        (unreachable, timed out, stream closed or garbled), which another may not."""
        retryable = is_retryable(exc) if isinstance(exc, RemoteError) else True
        return cls(_reason(exc), retryable=retryable, peer=peer, error=exc)

    @classmethod
    def wrong_answer(cls, exc: Exception, *, peer: str = "") -> HopFailure:
        """The reply failed our checks (tensor, shape, proof): the peer's fault."""
        return cls(_reason(exc), retryable=True, faulty=True, peer=peer, error=exc)

    @classmethod
    def timed_out(cls, seconds: float) -> HopFailure:
        return cls(f"no answer within {seconds:g} s")


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, P2PInferError) else (str(exc) or type(exc).__name__)


# ---- actions ----


@dataclass(frozen=True)
class SendHop:
    """Send ``activation`` for layers ``first..last`` to ``peer_id``; answer by ``deadline``."""

    request_id: str
    peer_id: str
    first: int
    last: int
    activation: WireTensor
    deadline: float
    purpose: Purpose = "hop"
    prove: bool | str = False  # zk: True = proof in the reply, "follow" = a token to fetch it later
    mask: WireTensor | None = None  # the attention mask, for sequence models
    session: str = ""  # one per query (a trial draws its own), so no request stands out by having none


@dataclass(frozen=True)
class RouteStep:
    peer_id: str
    first: int
    last: int


@dataclass(frozen=True)
class SendForward:
    """Send ``activation`` to ``route[0]`` with the rest of the route; the last step answers."""

    request_id: str
    route: tuple[RouteStep, ...]
    activation: WireTensor
    deadline: float
    mask: WireTensor | None = None
    session: str = ""

    @property
    def reply_from(self) -> str:
        return self.route[-1].peer_id  # only the route's last hop may send the result


@dataclass(frozen=True)
class AwaitResult:
    """The first hop took the forwarding request: wait for the result until ``deadline``."""

    request_id: str
    deadline: float


@dataclass(frozen=True)
class RefreshDirectory:
    """Re-read the overlay, then call ``on_servers`` (no route among the servers known)."""


@dataclass(frozen=True)
class Arbitrate:
    """Two providers disagree: run layers ``first..last`` on ``activation`` locally, then ``on_arbitration``."""

    first: int
    last: int
    activation: WireTensor
    mask: WireTensor | None = None


@dataclass(frozen=True)
class Record:
    """One reputation outcome for ``peer_id``."""

    peer_id: str
    fault: bool


@dataclass(frozen=True)
class Forget:
    """``peer_id`` failed: drop its pooled stream and measured round trip."""

    peer_id: str


@dataclass(frozen=True)
class HopTrace:
    peer_id: str
    first: int
    last: int
    compute_ms: float = 0.0
    queue_ms: float = 0.0
    round_trip_ms: float = 0.0  # hop by hop: request sent to reply read


@dataclass(frozen=True)
class Done:
    output: WireTensor  # the activation after the last remote layer
    hops: tuple[HopTrace, ...]
    mode: str
    failed: tuple[str, ...]
    spot_checks: tuple[dict[str, Any], ...] = ()
    evidence: tuple[Any, ...] = ()  # zk: one proof (or proof token) per hop, in route order; optimistic:
    # (input, output, signed commitment) per hop, in route order


@dataclass(frozen=True)
class Failed:
    error: Exception


Action = SendHop | SendForward | AwaitResult | RefreshDirectory | Arbitrate | Record | Forget | Done | Failed


@dataclass
class _Pending:
    purpose: Purpose
    peer_id: str
    first: int
    last: int
    sent_at: float
    deadline: float


@dataclass
class _Held:
    """A primary's answer waiting on its spot check."""

    hop: _Pending
    output: WireTensor
    trace: HopTrace
    evidence: Any
    check: dict[str, Any]
    second: WireTensor | None = None


def new_request_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def hop_trace(pending: _Pending, timing: Mapping[str, float], now: float) -> HopTrace:
    return HopTrace(pending.peer_id, pending.first, pending.last, float(timing.get("compute_ms", 0.0)),
                    float(timing.get("queue_ms", 0.0)), (now - pending.sent_at) * 1000)


def forwarded_traces(trace: object) -> tuple[HopTrace, ...]:
    """The per-hop timings a forwarded result reports (peers write them: read defensively)."""
    entries = trace if isinstance(trace, list) else []
    return tuple(HopTrace(str(t.get("peer")), _int(t.get("first")), _int(t.get("last")), _float(t.get("compute_ms")),
                          _float(t.get("queue_ms"))) for t in entries if isinstance(t, dict))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass
class QueryMachine:
    """Runs the remote layers ``plan.local_layers..n_layers-1`` of one query on ``activation``."""

    plan: QueryPlan
    model_name: str
    n_layers: int
    activation: WireTensor  # the last good activation: what a failover replays
    servers: Sequence[Server]
    rng: random.Random
    mask: WireTensor | None = None  # constant along the route
    reputation: Callable[[str], float] = lambda _peer: 1.0  # read live: a fault mid-query counts at once
    min_reputation: float = 0.0  # servers under it are skipped (the client's trust threshold)
    timeout: float = 30.0  # seconds a peer has to answer one request
    session: str = ""  # sent with every request of this query; drawn from the rng when not given
    pos: int = field(init=False)  # the next layer to run
    failed: list[str] = field(init=False, default_factory=list)
    _sent: WireTensor = field(init=False)  # what the client sent first (a forwarding fallback restarts from it)
    _hops: list[HopTrace] = field(init=False, default_factory=list)
    _evidence: list[Any] = field(init=False, default_factory=list)
    _checks: list[dict[str, Any]] = field(init=False, default_factory=list)
    _pending: dict[str, _Pending] = field(init=False, default_factory=dict)
    _held: _Held | None = field(init=False, default=None)
    _refreshed: bool = field(init=False, default=False)  # since the last planning failure
    _forwarding: bool = field(init=False, default=False)
    _mode: str = field(init=False, default="client")
    finished: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.plan.validate()
        if self.plan.check not in ("none", "spot-check", "zk", "optimistic"):
            raise UnsupportedMode(f"unsupported mode: check {self.plan.check} has its own driver, not QueryMachine")
        if self.plan.local_layers >= self.n_layers:
            raise UsageError(f"{self.model_name} has {self.n_layers} layers; the client keeps {self.plan.local_layers} locally")
        self.pos = self.plan.local_layers
        self.session = self.session or new_request_id(self.rng)
        self._sent = self.activation
        self._forwarding = self.plan.transport == "forwarding"
        self._mode = "critical" if self.plan.check == "zk" else "forwarding" if self._forwarding else "client"
        if self.plan.check == "optimistic":
            self._mode = f"optimistic p={self.plan.optimistic:g}"

    # ---- events ----

    def start(self, now: float) -> list[Action]:
        return self._next(now)

    def on_servers(self, servers: Sequence[Server], now: float) -> list[Action]:
        """The directory was refreshed: plan again with these servers."""
        self.servers = list(servers)
        self._refreshed = True
        return self._next(now)

    def on_reply(self, request_id: str, output: WireTensor, now: float, *, timing: Mapping[str, float] | None = None,
                 evidence: Any = None, trace: object = ()) -> list[Action]:
        """A checked answer (the driver validated the tensor and any proof). Late or unknown ids are ignored."""
        pending = self._pending.pop(request_id, None)
        if pending is None or self.finished:
            return []
        if pending.purpose == "forward":
            return self._finish(output, forwarded_traces(trace))
        if pending.purpose == "check":
            return self._on_check_reply(output, now)
        return self._on_hop_reply(pending, output, hop_trace(pending, timing or {}, now), evidence, now)

    def on_failure(self, request_id: str, failure: HopFailure, now: float) -> list[Action]:
        pending = self._pending.pop(request_id, None)
        if pending is None or self.finished:
            return []
        if pending.purpose == "forward":
            return self._fall_back(failure, now)
        if pending.purpose == "check":
            return self._settle_check("checker unavailable", now)
        return self._fail_over(pending, failure, now)

    def on_accepted(self, request_id: str, now: float) -> list[Action]:
        """The first hop acknowledged a forwarding request: the route now has ``timeout`` to answer."""
        pending = self._pending.get(request_id)
        if pending is None or self.finished:
            return []
        pending.deadline = now + self.timeout
        return [AwaitResult(request_id, pending.deadline)]

    def on_arbitration(self, truth: WireTensor, now: float) -> list[Action]:
        """The client's own output for the disputed stage: it judges both providers."""
        held = self._held
        if held is None or held.second is None:
            return []
        answers = ((held.hop.peer_id, held.output), (held.check["checker"], held.second))
        wrong = [peer for peer, out in answers if not outputs_agree(out, truth)]
        held.check.update(outcome="disagree", wrong=wrong)
        records: list[Action] = [Record(peer, fault=peer in wrong) for peer, _ in answers]
        held.output = truth
        return records + self._settle_check(None, now)

    def poll(self, now: float) -> list[Action]:
        """Expire every request past its deadline, as if it had failed."""
        actions: list[Action] = []
        for request_id in [r for r, p in self._pending.items() if p.deadline <= now]:
            actions += self.on_failure(request_id, HopFailure.timed_out(self.timeout), now)
        return actions

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    # ---- planning ----

    def _route_from(self, first: int) -> list[Segment]:
        return plan_route(self.servers, first, self.n_layers - 1, exclude=self.failed, reputation=self.reputation,
                          min_reputation=self.min_reputation, model_name=self.model_name,
                          whole_shards=self.plan.check == "zk", require_tee=self.plan.require_tee)

    def _next(self, now: float) -> list[Action]:
        """Plan from ``pos``; on no route, refresh the directory once, then give up."""
        try:
            route = self._route_from(self.pos)
        except NoRoute as exc:
            if self._refreshed:
                return self._fail(exc)
            return [RefreshDirectory()]  # maybe a replacement joined since the last refresh
        if self._forwarding:
            return [self._send_forward(route, now)]
        return [self._send_hop(route[0].peer_id, route[0].first, route[0].last, "hop", now)]

    def _send_hop(self, peer_id: str, first: int, last: int, purpose: Purpose, now: float) -> SendHop:
        request_id = self._track(purpose, peer_id, first, last, now)
        prove: bool | str = ("follow" if self.plan.proof_follows else True) if self.plan.check == "zk" else False
        return SendHop(request_id, peer_id, first, last, self.activation, now + self.timeout, purpose, prove, self.mask,
                       self.session)

    def _send_forward(self, route: list[Segment], now: float) -> SendForward:
        request_id = self._track("forward", route[0].peer_id, route[0].first, route[-1].last, now)
        steps = tuple(RouteStep(s.peer_id, s.first, s.last) for s in route)
        return SendForward(request_id, steps, self.activation, now + self.timeout, self.mask, self.session)

    def _track(self, purpose: Purpose, peer_id: str, first: int, last: int, now: float) -> str:
        request_id = new_request_id(self.rng)
        self._pending[request_id] = _Pending(purpose, peer_id, first, last, now, now + self.timeout)
        return request_id

    # ---- hop by hop ----

    def _on_hop_reply(self, hop: _Pending, output: WireTensor, trace: HopTrace, evidence: Any, now: float) -> list[Action]:
        checker = self._pick_checker(hop)
        if checker is None:
            return self._accept(hop, output, trace, evidence, now)
        check = {"first": hop.first, "last": hop.last, "primary": hop.peer_id, "checker": checker}
        self._held = _Held(hop, output, trace, evidence, check)
        return [self._send_hop(checker, hop.first, hop.last, "check", now)]

    def _accept(self, hop: _Pending, output: WireTensor, trace: HopTrace, evidence: Any, now: float) -> list[Action]:
        if self.plan.check == "zk":
            self._evidence.append(evidence)
        elif self.plan.check == "optimistic":  # what the stage was sent, what came back, the signed commitment
            self._evidence.append((self.activation, output, evidence))
        self.activation = output
        self._hops.append(trace)
        self.pos = hop.last + 1
        self._refreshed = False
        if self.pos >= self.n_layers:
            return self._finish(output, tuple(self._hops))
        return self._next(now)

    def _fail_over(self, hop: _Pending, failure: HopFailure, now: float) -> list[Action]:
        """Exclude the peer, then re-route the layers still to run from the last good activation."""
        if not failure.retryable:
            return self._fail(failure.error or P2PInferError(failure.reason))
        peer = failure.peer or hop.peer_id
        actions: list[Action] = [Record(peer, fault=True)] if failure.faulty else []
        actions.append(Forget(peer))
        self.failed.append(peer)
        if len(self.failed) > self.plan.max_retries:
            return actions + self._fail(NoRoute(f"{self.model_name}: gave up after {len(self.failed)} failed hops ({failure.reason})"))
        return actions + self._next(now)

    # ---- spot checks ----

    def _pick_checker(self, hop: _Pending) -> str | None:
        """With probability ``plan.spot_check``, one other provider of the same layers, at random."""
        if self.plan.check != "spot-check" or not self.rng.random() < self.plan.spot_check:
            return None
        others = [s.peer_id for s in self.servers if s.first <= hop.first and hop.last <= s.last
                  and s.peer_id != hop.peer_id and s.peer_id not in self.failed
                  and self.reputation(s.peer_id) >= self.min_reputation]
        return self.rng.choice(others) if others else None

    def _on_check_reply(self, second: WireTensor, now: float) -> list[Action]:
        held = self._held
        assert held is not None
        if outputs_agree(held.output, second):
            held.check["outcome"] = "agree"
            records: list[Action] = [Record(held.hop.peer_id, False), Record(held.check["checker"], False)]
            return records + self._settle_check(None, now)
        held.second = second
        return [Arbitrate(held.hop.first, held.hop.last, self.activation, self.mask)]

    def _settle_check(self, outcome: str | None, now: float) -> list[Action]:
        held = self._held
        assert held is not None
        self._held = None
        if outcome is not None:
            held.check["outcome"] = outcome
        self._checks.append(held.check)
        return self._accept(held.hop, held.output, held.trace, held.evidence, now)

    # ---- forwarding ----

    def _fall_back(self, failure: HopFailure, now: float) -> list[Action]:
        """Forwarding failed somewhere: re-run the whole route hop by hop, without the peer that failed."""
        actions: list[Action] = []
        if failure.peer:
            self.failed.append(failure.peer)
            actions.append(Forget(failure.peer))
        self._forwarding = False
        self._mode = "client (after forwarding failed)"
        self.activation, self.pos, self._refreshed = self._sent, self.plan.local_layers, False
        return actions + self._next(now)

    # ---- the end ----

    def _finish(self, output: WireTensor, hops: tuple[HopTrace, ...]) -> list[Action]:
        self.finished = True
        return [Done(output, hops, self._mode, tuple(self.failed), tuple(self._checks), tuple(self._evidence))]

    def _fail(self, error: Exception) -> list[Action]:
        self.finished = True
        self._pending.clear()
        return [Failed(error)]
