"""Generation sessions on the serving side (``/p2p-infer/session/2.0.0``): message codecs and
the bounded session table. Sans-IO: the clock (``now``, seconds, any monotonic origin) comes
with every call; the KV caches themselves live in the driver (``node/session_handler.py``),
which drops a session's cache whenever the table says it is gone.

A session is bound to the client peer id that opened it (another client's steps are
refused), holds one layer range of one model, and accepts steps in order: step numbers only
grow, and a step comes at ``position`` = the tokens already cached. Forwarded decode (2.0.0):
the session may also take steps from one ``upstream`` peer (the previous hop of the route,
named by the client at open or by ``session_link``); only the client may rewind (a step at a
position below the cached length truncates the cache first: the redo of a forwarded token
that failed part-way). Limits (:class:`SessionLimits`): sessions
in total and per client, tokens per session, and a memory budget: opening reserves
``max_length`` tokens' worth of KV cache, so a peer's cache memory is bounded by the budget
however clients behave. An idle session expires after ``ttl`` seconds; ``close`` frees it
at once. Spec: ``protocols/session.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ForeignSession, OutOfOrder, ProtocolViolation, SessionLimit, SessionTooLong, UnknownSession
from .tensors import WireTensor, check_wire_tensor, wire_array
from .wire import (SESSION_CLOSE, SESSION_CLOSED, SESSION_FORWARDED, SESSION_LINK, SESSION_LINKED, SESSION_OPEN,
                   SESSION_OPENED, SESSION_OUTPUT, SESSION_PROTOCOL, SESSION_STEP, Message, expect)

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_HOPS = 31  # downstream hops a forwarded step may name
MAX_PEER_ID = 128


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 64
    max_sessions_per_client: int = 8
    max_tokens: int = 2048  # per session
    memory_budget: int = 512 * 1024 * 1024  # KV-cache bytes reserved over all sessions
    ttl: float = 120.0  # seconds a session may sit idle


# ---- messages ----


@dataclass(frozen=True)
class OpenRequest:
    session: str
    model_id: str
    first: int
    last: int
    max_length: int
    upstream: str | None = None  # the peer that may send forwarded steps (the previous hop)

    def to_wire(self) -> Message:
        return {"type": SESSION_OPEN, "session": self.session, "model": self.model_id, "first": self.first,
                "last": self.last, "max_length": self.max_length, "upstream": self.upstream}


@dataclass(frozen=True)
class Hop:
    """A downstream hop of a forwarded step: whom to pass the output on to, and that hop's
    session's step number and position (the client numbers every hop's steps)."""

    peer: str
    session: str
    step: int
    position: int

    def to_wire(self) -> Message:
        return {"peer": self.peer, "session": self.session, "step": self.step, "position": self.position}


@dataclass(frozen=True)
class LinkRequest:
    session: str
    upstream: str | None

    def to_wire(self) -> Message:
        return {"type": SESSION_LINK, "session": self.session, "upstream": self.upstream}


@dataclass(frozen=True)
class StepRequest:
    session: str
    step: int
    position: int
    hidden: WireTensor
    commit: bool = False  # ask for a signed commitment to the output digest (verified generation)
    forward: bool = False  # forwarded decode: pass the output on along ``route`` (the last hop: to the client)
    route: tuple[Hop, ...] = ()
    request_id: str = ""  # forwarded: the id the last hop's forward_result to the client carries

    @property
    def tokens(self) -> int:
        return int(self.hidden["shape"][1])

    def to_wire(self) -> Message:
        message: Message = {"type": SESSION_STEP, "session": self.session, "step": self.step, "position": self.position,
                            "hidden": self.hidden, "commit": self.commit}
        if self.forward:
            message.update(forward=True, route=[h.to_wire() for h in self.route], request_id=self.request_id)
        return message


def _int(message: Message, key: str, low: int = 0) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ProtocolViolation(f"{message.get('type')}: {key!r} must be an integer >= {low}")
    return value


def _session_id(message: Message) -> str:
    session = message.get("session")
    if not isinstance(session, str) or not SESSION_ID.match(session):
        raise ProtocolViolation(f"{message.get('type')}: 'session' must be 32 lowercase hex characters")
    return session


def _peer(value: Any, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID:
        raise ProtocolViolation(f"{what} must be a peer id (a string of 1-{MAX_PEER_ID} characters)")
    return value


def _route(message: Message) -> tuple[Hop, ...]:
    route = message.get("route", [])
    if not isinstance(route, list) or len(route) > MAX_HOPS:
        raise ProtocolViolation(f"session_step: 'route' must be a list of at most {MAX_HOPS} hops")
    hops = []
    for hop in route:
        if not isinstance(hop, dict):
            raise ProtocolViolation("session_step: a route hop must be a map")
        hops.append(Hop(str(_peer(hop.get("peer"), "route hop 'peer'")), _session_id({**hop, "type": "route hop"}),
                        _int(hop, "step"), _int(hop, "position")))
    return tuple(hops)


def parse_request(message: Message, hidden_size: int | None = None) -> OpenRequest | StepRequest | LinkRequest | str:
    """The typed request (a close is its session id); ProtocolViolation/BadTensor name the flaw."""
    kind = expect(SESSION_PROTOCOL, message)
    session = _session_id(message)
    if kind == SESSION_CLOSE:
        return session
    if kind == SESSION_LINK:
        return LinkRequest(session, _peer(message.get("upstream"), "session_link: 'upstream'", optional=True))
    if kind == SESSION_OPEN:
        model = message.get("model")
        if not isinstance(model, str) or not MODEL_ID.match(model):
            raise ProtocolViolation("session_open: 'model' must be a model id (64 lowercase hex)")
        first, last = _int(message, "first"), _int(message, "last")
        if last < first:
            raise ProtocolViolation("session_open: 'last' must be >= 'first'")
        upstream = _peer(message.get("upstream"), "session_open: 'upstream'", optional=True)
        return OpenRequest(session, model, first, last, _int(message, "max_length", 1), upstream)
    hidden = check_wire_tensor(message.get("hidden"), field="hidden")
    shape = hidden["shape"]
    if hidden["dtype"] != "float32" or len(shape) != 3 or shape[0] != 1 or (hidden_size is not None and shape[2] != hidden_size):
        raise ProtocolViolation(f"session_step: 'hidden' must be float32 [1, T, {hidden_size or 'H'}], got {hidden['dtype']} {shape}")
    commit, forward = message.get("commit", False), message.get("forward", False)
    if not isinstance(commit, bool) or not isinstance(forward, bool):
        raise ProtocolViolation("session_step: 'commit' and 'forward' must be booleans")
    route, request_id = (), ""
    if forward:
        route = _route(message)
        request_id = message.get("request_id")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise ProtocolViolation("session_step: a forwarded step needs a 'request_id' of 1-128 characters")
    elif "route" in message:
        raise ProtocolViolation("session_step: 'route' is only for forwarded steps")
    return StepRequest(session, _int(message, "step"), _int(message, "position"), hidden, commit, forward, route, request_id)


def opened_reply(session: str, max_length: int, ttl: float) -> Message:
    return {"type": SESSION_OPENED, "session": session, "max_length": max_length, "ttl_ms": int(ttl * 1000)}


def output_reply(session: str, step: int, hidden: WireTensor, compute_ms: float, queue_ms: float,
                 commitment: dict[str, Any] | None = None) -> Message:
    reply: Message = {"type": SESSION_OUTPUT, "session": session, "step": step, "hidden": hidden,
                      "timing": {"compute_ms": compute_ms, "queue_ms": queue_ms}}
    if commitment is not None:
        reply["commitment"] = commitment
    return reply


def closed_reply(session: str) -> Message:
    return {"type": SESSION_CLOSED, "session": session}


def linked_reply(session: str) -> Message:
    return {"type": SESSION_LINKED, "session": session}


def hop_entry(peer: str, reply: Message) -> Message:
    """One hop's part of a forwarded reply: its ``session_output`` fields and its peer id."""
    return {"peer": peer, **{k: reply[k] for k in ("session", "step", "hidden", "timing", "commitment") if k in reply}}


def forwarded_reply(session: str, step: int, hops: list[Message], failed: Message | None = None) -> Message:
    """A forwarded step's reply to its sender: the entries of this hop and every hop after it
    that answered, in route order; ``failed`` names the first hop that did not."""
    reply: Message = {"type": SESSION_FORWARDED, "session": session, "step": step, "hops": hops}
    if failed is not None:
        reply["failed"] = failed
    return reply


def parse_output(message: Message, session: str, step: int, tokens: int, hidden_size: int) -> WireTensor:
    """A step's reply, checked against the step it answers."""
    if message.get("type") != SESSION_OUTPUT or message.get("session") != session or message.get("step") != step:
        raise ProtocolViolation(f"expected session_output for step {step} of {session[:8]}, got {message.get('type')!r}")
    hidden = check_wire_tensor(message.get("hidden"), field="hidden")
    if hidden["dtype"] != "float32" or list(hidden["shape"]) != [1, tokens, hidden_size]:
        raise ProtocolViolation(f"session_output: hidden must be float32 [1, {tokens}, {hidden_size}], got {hidden['shape']}")
    wire_array(hidden)
    return hidden


# ---- the table ----


@dataclass
class Session:
    session: str
    client: str
    model_id: str
    first: int
    last: int
    max_length: int
    reserved: int  # KV bytes reserved at open
    expires: float
    length: int = 0  # tokens cached
    next_step: int = 0  # step numbers only grow (a forwarded token that failed part-way leaves a gap)
    busy: bool = False  # a step is computing: it cannot expire under it
    upstream: str | None = None  # the one peer besides the client that may send (forwarded) steps


@dataclass
class SessionTable:
    limits: SessionLimits
    bytes_per_token_layer: int  # KV bytes one token costs on one layer
    sessions: dict[str, Session] = field(default_factory=dict)

    @property
    def reserved(self) -> int:
        return sum(s.reserved for s in self.sessions.values())

    def open(self, client: str, req: OpenRequest, now: float) -> Session:
        if req.session in self.sessions:
            owner = self.sessions[req.session].client
            raise ForeignSession("session id in use by another client") if owner != client else OutOfOrder("session already open")
        if req.max_length > self.limits.max_tokens:
            raise SessionTooLong(f"max_length {req.max_length} exceeds this peer's {self.limits.max_tokens} tokens per session")
        if len(self.sessions) >= self.limits.max_sessions:
            raise SessionLimit(f"this peer holds its maximum of {self.limits.max_sessions} sessions")
        if sum(s.client == client for s in self.sessions.values()) >= self.limits.max_sessions_per_client:
            raise SessionLimit(f"this peer holds {self.limits.max_sessions_per_client} sessions of this client already")
        cost = req.max_length * (req.last - req.first + 1) * self.bytes_per_token_layer
        if self.reserved + cost > self.limits.memory_budget:
            raise SessionLimit(f"a {req.max_length}-token session needs {cost} bytes of KV cache; "
                               f"{self.limits.memory_budget - self.reserved} of the budget are free")
        session = Session(req.session, client, req.model_id, req.first, req.last, req.max_length, cost, now + self.limits.ttl,
                          upstream=req.upstream)
        self.sessions[req.session] = session
        return session

    def _owned(self, client: str, session: str) -> Session:
        found = self.sessions.get(session)
        if found is None:
            raise UnknownSession(f"no session {session[:8]}... here (never opened, closed or expired)")
        if found.client != client:
            raise ForeignSession(f"session {session[:8]}... belongs to another client")
        return found

    def link(self, client: str, req: LinkRequest) -> None:
        self._owned(client, req.session).upstream = req.upstream

    def begin_step(self, sender: str, req: StepRequest, now: float) -> tuple[Session, int]:
        """Admit a step from the client or the session's upstream peer; the position to
        truncate the cache to first (the client's rewind; = length otherwise). The driver then
        computes and calls :meth:`end_step`."""
        s = self.sessions.get(req.session)
        if s is None:
            raise UnknownSession(f"no session {req.session[:8]}... here (never opened, closed or expired)")
        from_client = sender == s.client
        if not from_client and (s.upstream is None or sender != s.upstream):
            raise ForeignSession(f"session {req.session[:8]}... belongs to another client")
        if s.busy:
            raise OutOfOrder(f"step {req.step} sent while step {s.next_step} is computing")
        if req.step < s.next_step or req.position > s.length or (req.position < s.length and not from_client):
            raise OutOfOrder(f"expected step >= {s.next_step} at position {s.length}, got step {req.step} at {req.position}")
        if req.position + req.tokens > s.max_length:
            raise SessionTooLong(f"{req.position} + {req.tokens} tokens exceed the session's max_length {s.max_length}")
        s.busy, s.length = True, req.position
        s.expires = now + self.limits.ttl
        return s, req.position

    def end_step(self, session: str, step: int, tokens: int, now: float) -> None:
        s = self.sessions[session]
        s.busy, s.length, s.next_step, s.expires = False, s.length + tokens, step + 1, now + self.limits.ttl

    def drop(self, session: str) -> None:
        """Forget a session whatever its state (its step failed: the cache may be half-written)."""
        self.sessions.pop(session, None)

    def close(self, client: str, session: str) -> None:
        self._owned(client, session)
        del self.sessions[session]

    def expire(self, now: float) -> list[str]:
        """The sessions whose TTL passed, removed (the driver frees their caches)."""
        gone = [sid for sid, s in self.sessions.items() if not s.busy and s.expires <= now]
        for sid in gone:
            del self.sessions[sid]
        return gone
