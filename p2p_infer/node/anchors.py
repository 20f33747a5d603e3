"""A peer's part in anchoring audit logs (the rules: ``proto/checkpoints.py``).

Every ``checkpoint_interval`` seconds, if its own log grew, the peer makes the new entries
durable (fsync), signs a checkpoint of the log's length and head, and gossips it. It also
keeps, in its :class:`~p2p_infer.proto.checkpoints.WitnessTable`, the latest checkpoint it
saw from every other peer, and writes that table to its witness file crash-safely (temp
file, fsync, rename, fsync of the directory) whenever it changed, so a kill at any moment
leaves the previous table or the new one, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from ..clock import now_ms
from ..errors import CheckpointError
from ..files import fsync_file, write_atomically
from ..identity import Identity
from ..proto.audit import AuditLog
from ..proto.checkpoints import WitnessTable, checkpoint_message, sign_checkpoint

log = structlog.get_logger("p2p_infer.anchors")


class Anchors:
    def __init__(self, identity: Identity, audit: AuditLog, witness_file: Path, interval: float,
                 publish: Callable[[dict[str, Any]], None]) -> None:
        self.identity = identity
        self.audit = audit
        self.witness_file = witness_file
        self.interval = interval
        self.publish = publish
        self.witnesses = load_witnesses(witness_file)
        self._published: tuple[int, str] | None = None

    async def run(self) -> None:
        """The periodic task a peer runs (``peer.py``); ends only when cancelled."""
        try:
            while True:
                await trio.sleep(self.interval)
                await self.tick()
        finally:
            with trio.CancelScope(shield=True):  # what was witnessed since the last tick survives shutdown
                self.save_if_changed()

    async def tick(self) -> None:
        head = (self.audit.seq, self.audit.head)  # taken before the fsync: every entry it covers is then on disk
        if head[0] and head != self._published:
            # An honest peer must never sign a head it could lose in a crash: that would look like truncation.
            await trio.to_thread.run_sync(fsync_file, self.audit.path)
            checkpoint = sign_checkpoint(self.identity, head[0], head[1], now_ms())
            self.publish(checkpoint_message(checkpoint))
            self._published = head
            log.debug("checkpoint published", entries=head[0])
        if self.witnesses.dirty:
            await trio.to_thread.run_sync(self.save_if_changed)

    def save_if_changed(self) -> None:
        if self.witnesses.dirty:
            self.witnesses.dirty = False
            try:
                write_atomically(self.witness_file, self.witnesses.encode())
            except OSError as exc:  # a full disk must not stop the peer; the table stays in memory
                self.witnesses.dirty = True
                log.warning("witness file not written", path=str(self.witness_file), error=str(exc))


def load_witnesses(path: Path) -> WitnessTable:
    """The witness file, or an empty table; an unreadable file is moved aside, not trusted."""
    if not path.exists():
        return WitnessTable()
    try:
        return WitnessTable.decode(path.read_bytes())
    except (CheckpointError, OSError) as exc:
        aside = path.with_name(f"{path.name}.corrupt-{now_ms()}")
        os.replace(path, aside)
        log.warning("witness file unreadable; moved aside", path=str(path), aside=str(aside), reason=str(exc))
        return WitnessTable()


def load_witness_file(path: Path) -> WitnessTable:
    """Someone's witness file, for ``p2p-infer audit --witness``: unreadable is an error, not empty."""
    try:
        return WitnessTable.decode(path.read_bytes())
    except CheckpointError as exc:
        raise CheckpointError(f"witness file {path}: {exc.message}") from None
