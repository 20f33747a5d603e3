"""An append-only, hash-chained, signed log of what a peer saw: commitments, reveals,
verdicts, evidence and reputation changes.

Each line is a JSON object ``{"seq", "time_ms", "kind", "data", "prev", "hash", "sig"}``
where ``hash = sha256(prev || canonical(seq, time_ms, kind, data))`` and ``sig`` is the
owner's Ed25519 signature over ``hash``. Changing, removing or reordering any entry breaks
the chain from there on; ``p2p-infer audit`` verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..errors import AuditError
from ..identity import Identity, verify_signature

GENESIS = "0" * 64
log = structlog.get_logger("p2p_infer.audit")


def _canonical(seq: int, time_ms: int, kind: str, data: Any) -> bytes:
    return json.dumps([seq, time_ms, kind, data], sort_keys=True, separators=(",", ":")).encode()


def entry_hash(prev: str, seq: int, time_ms: int, kind: str, data: Any) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + _canonical(seq, time_ms, kind, data)).hexdigest()


@dataclass
class AuditLog:
    path: Path
    identity: Identity
    clock: Callable[[], int]  # ms since the epoch; handed in by the driver

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = repair_torn_tail(self.path, self.clock())
        entries = read_entries(self.path) if self.path.exists() else []
        self.seq = len(entries)
        self.head = entries[-1]["hash"] if entries else GENESIS

    def append(self, kind: str, data: dict[str, Any]) -> str:
        time_ms = self.clock()
        digest = entry_hash(self.head, self.seq, time_ms, kind, data)
        line = {"seq": self.seq, "time_ms": time_ms, "kind": kind, "data": data, "prev": self.head, "hash": digest,
                "sig": self.identity.sign(bytes.fromhex(digest)).hex(), "signer": self.identity.public_key.hex()}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        self.seq += 1
        self.head = digest
        return digest


def repair_torn_tail(path: Path, now_ms: int) -> Path | None:
    """A kill or a full disk mid-append leaves a last line without its newline (or cut
    JSON): move that tail to ``<log>.torn-<now_ms>`` and keep the whole entries before it.
    Returns where the tail went, or None when the log was whole. Only the tail is
    repaired: a damaged line in the middle is tampering for ``verify_log`` to report."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):  # every entry is written with its newline in one write
        return None
    cut = data.rfind(b"\n") + 1
    aside = path.with_name(f"{path.name}.torn-{now_ms}")
    aside.write_bytes(data[cut:])
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    log.warning("audit log had a torn last line; moved aside", log=str(path), tail=str(aside), bytes=len(data) - cut)
    return aside


def read_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify_log(path: Path) -> list[dict[str, Any]]:
    """Return the entries if the whole chain verifies; raise AuditError at the first break."""
    try:
        entries = read_entries(path)
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path}: line is not JSON: {exc}") from None
    prev, signer = GENESIS, None
    for i, e in enumerate(entries):
        if e.get("seq") != i or e.get("prev") != prev:
            raise AuditError(f"entry {i}: chain broken (missing, reordered or inserted entry)")
        if entry_hash(prev, i, e["time_ms"], e["kind"], e["data"]) != e["hash"]:
            raise AuditError(f"entry {i}: content does not match its hash (tampered)")
        signer = signer or e.get("signer")
        if e.get("signer") != signer or not verify_signature(bytes.fromhex(signer), bytes.fromhex(e["hash"]), bytes.fromhex(e["sig"])):
            raise AuditError(f"entry {i}: bad signature")
        prev = e["hash"]
    return entries
