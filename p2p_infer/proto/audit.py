"""An append-only, hash-chained, signed log of what a peer saw: commitments, reveals,
verdicts, evidence and reputation changes.

Each line is a JSON object ``{"seq", "time_ms", "kind", "data", "prev", "hash", "sig"}``
where ``hash = sha256(prev || canonical(seq, time_ms, kind, data))`` and ``sig`` is the
owner's Ed25519 signature over ``hash``. Changing, removing or reordering any entry breaks
the chain from there on; ``p2p-infer audit`` verifies it.

**Rotation.** Past ``max_bytes`` the live file is renamed ``<log>.<seq of its first entry,
12 digits>`` and a new live file continues the chain (same ``seq`` count, ``prev`` = the
last hash of the previous file). When all files together pass ``budget_bytes``, the oldest
rotated files are deleted and a signed ``pruned`` entry records where the kept chain now
starts (``first_kept_seq`` and that entry's ``prev``), so :func:`verify_log` can tell files
removed by the budget from files removed by anyone else.
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
MIB = 1024 * 1024
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
    max_bytes: int = 16 * MIB  # the live file rotates past this
    budget_bytes: int = 256 * MIB  # all files together; the oldest rotated ones go past it

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = repair_torn_tail(self.path, self.clock())
        entries = read_entries(self.path) if self.path.exists() else []
        if not entries and rotated_files(self.path):  # just rotated: the chain goes on from the last file
            entries = read_entries(rotated_files(self.path)[-1])[-1:]
        self.seq = entries[-1]["seq"] + 1 if entries else 0
        self.head = entries[-1]["hash"] if entries else GENESIS
        self.size = self.path.stat().st_size if self.path.exists() else 0

    def append(self, kind: str, data: dict[str, Any]) -> str:
        before = (self.seq, self.head)
        line = self._line(kind, data)
        if self.size and self.size + len(line) > self.max_bytes:
            self.seq, self.head = before  # not written: built again after the rotation
            self._rotate()
            line = self._line(kind, data)
        with open(self.path, "ab") as f:
            f.write(line)
        self.size += len(line)
        return self.head

    def _line(self, kind: str, data: dict[str, Any]) -> bytes:
        """The next entry, encoded, with ``seq``/``head`` advanced (written by the caller)."""
        time_ms = self.clock()
        digest = entry_hash(self.head, self.seq, time_ms, kind, data)
        line = {"seq": self.seq, "time_ms": time_ms, "kind": kind, "data": data, "prev": self.head, "hash": digest,
                "sig": self.identity.sign(bytes.fromhex(digest)).hex(), "signer": self.identity.public_key.hex()}
        self.seq += 1
        self.head = digest
        return (json.dumps(line, sort_keys=True) + "\n").encode()

    def _rotate(self) -> None:
        first = read_first_entry(self.path)
        os.replace(self.path, self.path.with_name(f"{self.path.name}.{first['seq'] if first else self.seq:012d}"))
        self.size = 0
        kept = self._enforce_budget()
        if kept is not None:
            with open(self.path, "ab") as f:
                line = self._line("pruned", kept)
                f.write(line)
            self.size += len(line)

    def _enforce_budget(self) -> dict[str, Any] | None:
        """Delete the oldest rotated files past the disk budget; what the chain now starts at."""
        files = rotated_files(self.path)
        total = sum(f.stat().st_size for f in files)
        removed = 0
        while files[:-1] and total > self.budget_bytes:  # the newest rotated file always stays
            total -= files[0].stat().st_size
            files.pop(0).unlink()
            removed += 1
        if not removed:
            return None
        first = read_first_entry(files[0])
        log.warning("audit log over its disk budget; oldest files deleted", log=str(self.path), files=removed,
                    first_kept_seq=first["seq"] if first else None)
        return {"first_kept_seq": first["seq"], "prev": first["prev"]} if first else None


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of a log, oldest first (names end in the first entry's seq)."""
    found = [p for p in path.parent.glob(f"{path.name}.*") if p.name[len(path.name) + 1:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(path.name) + 1:]))


def read_first_entry(path: Path) -> dict[str, Any] | None:
    with open(path, "rb") as f:
        line = f.readline()
    return json.loads(line) if line.strip() else None


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


def read_chain(path: Path) -> list[dict[str, Any]]:
    """Every entry of a log, its rotated files first."""
    entries: list[dict[str, Any]] = []
    for part in [*rotated_files(path), path]:
        if part.exists():
            entries += read_entries(part)
    return entries


def verify_log(path: Path) -> list[dict[str, Any]]:
    """Return the entries (rotated files included) if the whole chain verifies; raise
    AuditError at the first break. A chain that does not start at seq 0 must be vouched
    for by a signed ``pruned`` entry naming its first entry."""
    try:
        entries = read_chain(path)
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path}: line is not JSON: {exc}") from None
    if not entries:
        return entries
    start, prev = entries[0].get("seq"), entries[0].get("prev")
    if start != 0:
        vouched = any(e.get("kind") == "pruned" and e.get("data") == {"first_kept_seq": start, "prev": prev} for e in entries)
        if not isinstance(start, int) or not vouched:
            raise AuditError(f"entry {start}: chain does not start at 0 and no pruned entry accounts for it (files removed)")
    else:
        prev = GENESIS
    signer = None
    for offset, e in enumerate(entries):
        i = start + offset
        if e.get("seq") != i or e.get("prev") != prev:
            raise AuditError(f"entry {i}: chain broken (missing, reordered or inserted entry)")
        if entry_hash(prev, i, e["time_ms"], e["kind"], e["data"]) != e["hash"]:
            raise AuditError(f"entry {i}: content does not match its hash (tampered)")
        signer = signer or e.get("signer")
        if e.get("signer") != signer or not verify_signature(bytes.fromhex(signer), bytes.fromhex(e["hash"]), bytes.fromhex(e["sig"])):
            raise AuditError(f"entry {i}: bad signature")
        prev = e["hash"]
    return entries
