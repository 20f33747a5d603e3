"""Anchored audit logs: signed checkpoints, the witnesses that keep them, and the check of a
log against both. Sans-IO: no clock (times come in), no files (``node/anchors.py`` persists).

A hash-chained log signed by its owner proves that nobody *else* changed it; it does not
stop the owner from cutting its tail, emptying it, or re-signing a whole new history with
a fresh key. So every peer now and then gossips a **checkpoint**: its peer id, how many
entries its log holds, the hash of the last one, and the time, signed with the key its peer
id embeds. Other peers keep the latest checkpoint they saw per peer (**witnesses**). A log
is then checked (:func:`check_log_against`) against

* the key derived from the peer id, never a key written in the log, so a re-signed or
  replaced log fails at its first entry; and
* every witnessed checkpoint: the log must hold at least ``count`` entries, and entry
  ``count - 1`` must hash to the signed head; so truncation and rewriting of anything
  checkpointed fail.

What stays unanchored (docs/consensus.md, "Audit log"): entries written after the peer's
latest witnessed checkpoint, and everything if no witness is consulted.

Wire format and test vector: ``protocols/committee.md`` (gossip) and
``protocols/test-vectors/checkpoint.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import base58
import msgpack
import structlog

from ..bounded import trim_oldest
from ..errors import AuditError, AuditForeignSigner, AuditRewritten, AuditTruncated, CheckpointError, IdentityError
from ..identity import PUZZLE_DIFFICULTY, Identity, peer_id_bytes_from_public_key, solves_puzzle, verify_signature
from .audit import GENESIS, entry_hash
from .wire import CHECKPOINT

SIGNING_DOMAIN = b"p2p-infer/checkpoint/v1\n"
WITNESS_FILE_VERSION = 1
MAX_WITNESSED_PEERS = 4096  # gossip is unbounded input: the least recently updated peers are forgotten
MAX_CONFLICTS = 256
log = structlog.get_logger("p2p_infer.checkpoints")


def public_key_of(peer_id: str) -> bytes:
    """The Ed25519 key a peer id embeds (identity multihash), or CheckpointError."""
    try:
        raw = base58.b58decode(peer_id.encode())
        key = raw[6:]
        if len(raw) == 38 and peer_id_bytes_from_public_key(key) == raw:
            return key
    except (ValueError, IdentityError):
        pass
    raise CheckpointError(f"{peer_id[:20]!r} is not an Ed25519 peer id: no key to check against")


@dataclass(frozen=True)
class Checkpoint:
    """``peer_id``'s log held ``count`` entries, the last hashing to ``head``, at ``time_ms``."""

    peer_id: str
    count: int
    head: bytes  # 32 bytes: the last entry's hash (GENESIS for an empty log)
    time_ms: int
    signature: bytes = b""

    def body(self) -> bytes:
        return msgpack.packb([self.peer_id, self.count, self.head, self.time_ms], use_bin_type=True)

    def signed_bytes(self) -> bytes:
        return SIGNING_DOMAIN + self.body()

    def verify(self) -> Checkpoint:
        """Self, if signed by the key the peer id embeds; else CheckpointError."""
        if not verify_signature(public_key_of(self.peer_id), self.signed_bytes(), self.signature):
            raise CheckpointError(f"checkpoint of {self.peer_id} at {self.count} entries: bad signature")
        return self

    def to_wire(self) -> dict[str, Any]:
        return {"peer": self.peer_id, "count": self.count, "head": self.head, "time_ms": self.time_ms, "sig": self.signature}

    @classmethod
    def from_wire(cls, raw: Any) -> Checkpoint:
        if not isinstance(raw, dict):
            raise CheckpointError("checkpoint must be a map")
        peer, count, head, time_ms, sig = (raw.get(k) for k in ("peer", "count", "head", "time_ms", "sig"))
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (count, time_ms))
        if not (isinstance(peer, str) and len(peer) <= 128 and ints and isinstance(head, bytes) and len(head) == 32
                and isinstance(sig, bytes) and len(sig) == 64):
            raise CheckpointError("checkpoint must be {peer: str, count: int >= 0, head: bin32, time_ms: int >= 0, sig: bin64}")
        return cls(peer, count, head, time_ms, sig)

    def describe(self) -> str:
        return f"{self.count} entries, head {self.head.hex()[:16]}..., signed at {self.time_ms} ms"


def sign_checkpoint(identity: Identity, count: int, head: str | bytes, time_ms: int) -> Checkpoint:
    """A checkpoint of this peer's own log (``head`` as the log writes it: hex, or bytes)."""
    head_bytes = bytes.fromhex(head) if isinstance(head, str) else head
    unsigned = Checkpoint(identity.peer_id, count, head_bytes, time_ms)
    return Checkpoint(identity.peer_id, count, head_bytes, time_ms, identity.sign(unsigned.signed_bytes()))


def checkpoint_message(checkpoint: Checkpoint) -> dict[str, Any]:
    """The gossip message carrying it (protocols/committee.md)."""
    return {"type": CHECKPOINT, "checkpoint": checkpoint.to_wire()}


@dataclass
class WitnessTable:
    """The latest checkpoint seen per peer, and pairs that cannot both be honest.

    The latest is the one with the most entries: logs only grow, so a replayed old
    checkpoint changes nothing. Two signed checkpoints with the same count and different
    heads (a fork), or a later one with fewer entries (a rollback), are kept as
    ``conflicts``: signed proof that the peer rewrote its log."""

    latest: dict[str, Checkpoint] = field(default_factory=dict)  # ordered: least recently updated first
    conflicts: list[tuple[Checkpoint, Checkpoint]] = field(default_factory=list)
    max_peers: int = MAX_WITNESSED_PEERS
    dirty: bool = False  # changed since last persisted

    def observe(self, checkpoint: Checkpoint) -> str:
        """Verify and keep ``checkpoint``; returns "new", "same", "stale", "fork" or "rollback"."""
        checkpoint.verify()
        if not solves_puzzle(public_key_of(checkpoint.peer_id)):  # free identities would flush the bounded table
            raise CheckpointError(f"{checkpoint.peer_id} does not solve the identity puzzle ({PUZZLE_DIFFICULTY} bits)")
        known = self.latest.get(checkpoint.peer_id)
        if known is None or checkpoint.count > known.count:
            self._keep(checkpoint)
            return "new"
        if checkpoint.count == known.count and checkpoint.head == known.head:
            return "same"
        if checkpoint.count == known.count:
            self._conflict(known, checkpoint)
            return "fork"
        if checkpoint.time_ms > known.time_ms:
            self._conflict(known, checkpoint)
            return "rollback"
        return "stale"

    def of(self, peer_id: str) -> list[Checkpoint]:
        """Every checkpoint held about ``peer_id``: the latest and both sides of any conflict."""
        found = [c for pair in self.conflicts for c in pair if c.peer_id == peer_id]
        latest = self.latest.get(peer_id)
        return ([latest] if latest is not None else []) + found

    def _keep(self, checkpoint: Checkpoint) -> None:
        self.latest.pop(checkpoint.peer_id, None)
        self.latest[checkpoint.peer_id] = checkpoint
        trim_oldest(self.latest, self.max_peers)
        self.dirty = True

    def _conflict(self, known: Checkpoint, other: Checkpoint) -> None:
        log.warning("conflicting signed checkpoints: the peer rewrote its audit log", peer=known.peer_id,
                    known=known.describe(), other=other.describe())
        self.conflicts.append((known, other))
        del self.conflicts[:-MAX_CONFLICTS]
        self.dirty = True

    # ---- the witness file (node/anchors.py writes it crash-safely) ----

    def encode(self) -> bytes:
        return msgpack.packb({"version": WITNESS_FILE_VERSION, "checkpoints": [c.to_wire() for c in self.latest.values()],
                              "conflicts": [[a.to_wire(), b.to_wire()] for a, b in self.conflicts]}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> WitnessTable:
        """A witness file; CheckpointError if it is not one. Checkpoints are re-verified when used."""
        try:
            raw = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.ExtraData) as exc:
            raise CheckpointError(f"not a witness file: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != WITNESS_FILE_VERSION:
            raise CheckpointError(f"not a witness file of version {WITNESS_FILE_VERSION}")
        table = cls()
        for wire in raw.get("checkpoints") or []:
            checkpoint = Checkpoint.from_wire(wire)
            table.latest[checkpoint.peer_id] = checkpoint
        for pair in raw.get("conflicts") or []:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise CheckpointError("a conflict is a pair of checkpoints")
            table.conflicts.append((Checkpoint.from_wire(pair[0]), Checkpoint.from_wire(pair[1])))
        return table


def witness(table: WitnessTable | None, sender: str, message: dict[str, Any]) -> str:
    """The auditor's hook for a ``checkpoint`` gossip message: keep it if it verifies."""
    if table is None:
        return "ignored"
    try:
        outcome = table.observe(Checkpoint.from_wire(message.get("checkpoint")))
    except CheckpointError as exc:
        log.info("gossip rejected", kind=CHECKPOINT, sender=sender, reason=exc.message)
        return "rejected"
    log.debug("checkpoint witnessed", sender=sender, outcome=outcome)
    return outcome


# ---- checking a log ----


@dataclass(frozen=True)
class Anchoring:
    """What :func:`check_log_against` established about a log."""

    peer_id: str
    entries: int  # the log's length (seq of its last entry + 1)
    checked: tuple[Checkpoint, ...]  # checkpoints the log was found consistent with
    notes: tuple[str, ...] = ()

    @property
    def anchored_at(self) -> int:
        """Entries covered by a witnessed checkpoint; those after it are the peer's word alone."""
        return max((c.count for c in self.checked), default=0)


def check_log_against(entries: Sequence[dict[str, Any]], peer_id: str, checkpoints: Iterable[Checkpoint]) -> Anchoring:
    """Check a log's chain and signatures against ``peer_id``'s own key, then against every
    checkpoint of that peer; raise an :class:`AuditError` subclass naming what was done."""
    key = public_key_of(peer_id)
    start = _verify_chain(entries, key, peer_id)
    count = start + len(entries)
    hashes = {e["seq"]: e["hash"] for e in entries}
    checked, notes = [], []
    for checkpoint in checkpoints:
        if checkpoint.peer_id != peer_id:
            continue
        try:
            checkpoint.verify()
        except CheckpointError as exc:  # a witness file can hold junk; junk must neither fail nor pass a log
            notes.append(f"ignored: {exc.message}")
            continue
        _against(checkpoint, count, start, hashes)
        if checkpoint.count and checkpoint.count - 1 < start:
            notes.append(f"checkpoint at {checkpoint.count} entries falls in the pruned start; not checkable")
            continue
        checked.append(checkpoint)
    return Anchoring(peer_id, count, tuple(checked), tuple(notes))


def _against(checkpoint: Checkpoint, count: int, start: int, hashes: dict[int, str]) -> None:
    peer = checkpoint.peer_id
    if checkpoint.count > count:
        raise AuditTruncated(f"the log has {count} entries, but {peer} signed a checkpoint at {checkpoint.count} "
                             f"(time {checkpoint.time_ms} ms): entries {count}-{checkpoint.count - 1} were removed")
    if checkpoint.count == 0 or checkpoint.count - 1 < start:
        return
    if hashes[checkpoint.count - 1] != checkpoint.head.hex():
        raise AuditRewritten(f"entry {checkpoint.count - 1} is not the head {peer} signed at {checkpoint.count} entries "
                             f"(time {checkpoint.time_ms} ms): the log was rewritten or replaced")


def _verify_chain(entries: Sequence[dict[str, Any]], key: bytes, peer_id: str) -> int:
    """The hash chain, every entry signed by ``key``; returns the first entry's seq."""
    start, prev = 0, GENESIS
    if entries and entries[0].get("seq") != 0:
        start, prev = _vouched_start(entries)
    for offset, e in enumerate(entries):
        i = start + offset
        try:
            if e.get("seq") != i or e.get("prev") != prev:
                raise AuditError(f"entry {i}: chain broken (missing, reordered or inserted entry)")
            if entry_hash(prev, i, e["time_ms"], e["kind"], e["data"]) != e["hash"]:
                raise AuditError(f"entry {i}: content does not match its hash (tampered)")
            signed = verify_signature(key, bytes.fromhex(e["hash"]), bytes.fromhex(e["sig"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditError(f"entry {i}: malformed ({type(exc).__name__}: {exc})") from None
        if not signed:
            raise AuditForeignSigner(f"entry {i} is not signed by {peer_id}'s key"
                                     f"{' (it names signer ' + str(e.get('signer'))[:16] + '...)' if e.get('signer') != key.hex() else ''}: "
                                     "the log was re-signed or replaced")
        prev = e["hash"]
    return start


def _vouched_start(entries: Sequence[dict[str, Any]]) -> tuple[int, str]:
    """A log may start after 0 only where the peer's own signed ``pruned`` entry (written when
    a disk budget deleted old files) names that start; otherwise its head was cut."""
    start, prev = entries[0].get("seq"), entries[0].get("prev")
    vouched = any(e.get("kind") == "pruned" and e.get("data") == {"first_kept_seq": start, "prev": prev} for e in entries)
    if not isinstance(start, int) or not isinstance(prev, str) or not vouched:
        raise AuditTruncated(f"the log starts at entry {start}, and no signed pruned entry accounts for entries before it")
    return start, prev
