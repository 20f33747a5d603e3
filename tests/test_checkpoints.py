"""Anchored audit logs (issue 9): signed checkpoints, witnesses, and the check of a log against
the peer's own key and what witnesses saw. No network here; the swarm test is in
tests/test_anchors_swarm.py."""

import json
from itertools import count
from pathlib import Path

import msgpack
import pytest
import structlog

from p2p_infer.cli import main as cli_main
from p2p_infer.errors import AuditForeignSigner, AuditRewritten, AuditTruncated, CheckpointError
from p2p_infer.identity import Identity
from p2p_infer.files import write_atomically
from p2p_infer.node.anchors import Anchors, load_witnesses
from p2p_infer.proto.audit import AuditLog, read_entries, verify_log
from p2p_infer.proto.auditor import Auditor
from p2p_infer.proto.checkpoints import (
    Checkpoint,
    WitnessTable,
    check_log_against,
    checkpoint_message,
    public_key_of,
    sign_checkpoint,
)
from p2p_infer.proto.reputation import Reputation
from p2p_infer.proto.wire import CONSENSUS_TOPIC, expect

VECTOR = json.loads((Path(__file__).parent.parent / "protocols" / "test-vectors" / "checkpoint.json").read_text())


def main(argv: list[str]) -> int:
    """The CLI in-process; it points structlog at pytest's captured stderr, so put that back after."""
    try:
        return cli_main(argv)
    finally:
        structlog.reset_defaults()


def clock():
    ticks = count(1_764_000_000_000, 1000)
    return lambda: next(ticks)


def write_log(path: Path, identity: Identity, n: int, member: str = "m") -> AuditLog:
    log = AuditLog(path, identity, clock())
    for i in range(n):
        log.append("verdict", {"i": i, "member": f"{member}{i % 3}"})
    return log


def checkpoint_of(log: AuditLog, identity: Identity, time_ms: int = 1_764_000_100_000) -> Checkpoint:
    return sign_checkpoint(identity, log.seq, log.head, time_ms)


def resign(entries: list[dict], identity: Identity, path: Path) -> None:
    """What an attacker with a fresh key does: the same contents, chained and signed anew."""
    forged = AuditLog(path, identity, clock())
    for e in entries:
        forged.append(e["kind"], e["data"])


@pytest.fixture
def peer():
    return Identity.generate()


@pytest.fixture
def honest(tmp_path, peer):
    log = write_log(tmp_path / "peer.audit.log", peer, 10)
    return log, checkpoint_of(log, peer)


def test_the_checkpoint_signature_matches_the_spec_vector_byte_for_byte():
    ident = Identity.from_seed(bytes.fromhex(VECTOR["seed_hex"]))
    assert ident.public_key.hex() == VECTOR["public_key_hex"] and ident.peer_id == VECTOR["peer_id"]
    cp = sign_checkpoint(ident, VECTOR["count"], VECTOR["head_hex"], VECTOR["time_ms"])
    assert cp.body().hex() == VECTOR["body_hex"]
    assert cp.signed_bytes().hex() == VECTOR["signed_bytes_hex"]
    assert cp.signature.hex() == VECTOR["signature_hex"]
    message = msgpack.unpackb(bytes.fromhex(VECTOR["gossip_message_hex"]), raw=False)
    assert expect(CONSENSUS_TOPIC, message) == "checkpoint"
    assert Checkpoint.from_wire(message["checkpoint"]).verify() == cp
    assert msgpack.packb(checkpoint_message(cp), use_bin_type=True).hex() == VECTOR["gossip_message_hex"]
    assert public_key_of(ident.peer_id) == ident.public_key
    assert ident.solves_puzzle and WitnessTable().observe(cp) == "new"  # a witness keeps the vector's checkpoint


def test_an_honest_log_passes_against_its_peer_key_and_checkpoint(honest, peer):
    log, cp = honest
    for extra in range(3):  # entries after the checkpoint are fine: they are just not anchored yet
        log.append("verdict", {"later": extra})
    result = check_log_against(read_entries(log.path), peer.peer_id, [cp])
    assert result.entries == 13 and result.anchored_at == 10 and result.checked == (cp,)


@pytest.mark.parametrize("keep", [9, 5, 0], ids=["tail", "half", "all"])
def test_a_truncated_log_is_detected(honest, peer, keep):
    log, cp = honest
    entries = read_entries(log.path)[:keep]
    with pytest.raises(AuditTruncated, match=f"the log has {keep} entries, but {peer.peer_id} signed a checkpoint at 10"):
        check_log_against(entries, peer.peer_id, [cp])


def test_a_log_with_its_head_cut_is_detected_even_without_a_checkpoint(honest, peer):
    log, _ = honest
    with pytest.raises(AuditTruncated, match="starts at entry 3"):
        check_log_against(read_entries(log.path)[3:], peer.peer_id, [])


def test_a_log_re_signed_by_a_fresh_key_fails_against_the_real_peer(honest, peer, tmp_path):
    log, cp = honest
    fresh = tmp_path / "forged.audit.log"
    resign(read_entries(log.path), Identity.generate(), fresh)
    assert len(verify_log(fresh)) == 10  # the self-contained check alone is fooled: it takes the signer from the log
    with pytest.raises(AuditForeignSigner, match=f"entry 0 is not signed by {peer.peer_id}'s key"):
        check_log_against(read_entries(fresh), peer.peer_id, [cp])
    with pytest.raises(AuditForeignSigner):  # and naming the real key in each entry does not help
        check_log_against([{**e, "signer": peer.public_key.hex()} for e in read_entries(fresh)], peer.peer_id, [])


def test_a_history_rewritten_by_the_peer_itself_fails_against_its_checkpoint(honest, peer, tmp_path):
    log, cp = honest
    other = write_log(tmp_path / "rewritten.audit.log", peer, 12, member="x")  # its own key, another history, longer
    with pytest.raises(AuditRewritten, match="entry 9 is not the head"):
        check_log_against(read_entries(other.path), peer.peer_id, [cp])


def test_junk_in_witness_files_neither_fails_nor_passes_a_log(honest, peer):
    log, cp = honest
    forged = Checkpoint(peer.peer_id, 999, cp.head, cp.time_ms, bytes(64))
    someone_else = sign_checkpoint(Identity.generate(), 999, cp.head, cp.time_ms)
    result = check_log_against(read_entries(log.path), peer.peer_id, [forged, someone_else])
    assert result.checked == () and result.anchored_at == 0 and "bad signature" in result.notes[0]


def test_the_witness_table_keeps_the_latest_and_the_proof_of_a_rewrite(peer):
    table = WitnessTable()
    head = lambda b: bytes([b]) * 32  # noqa: E731
    first, later = sign_checkpoint(peer, 5, head(1), 1000), sign_checkpoint(peer, 8, head(2), 2000)
    assert [table.observe(c) for c in (first, later, first, later)] == ["new", "new", "stale", "same"]
    assert table.latest[peer.peer_id] == later and table.dirty
    fork = sign_checkpoint(peer, 8, head(3), 2500)
    rollback = sign_checkpoint(peer, 2, head(4), 3000)
    assert table.observe(fork) == "fork" and table.observe(rollback) == "rollback"
    assert table.conflicts == [(later, fork), (later, rollback)] and set(table.of(peer.peer_id)) == {later, fork, rollback}
    with pytest.raises(CheckpointError, match="bad signature"):
        table.observe(Checkpoint(peer.peer_id, 100, head(5), 4000, bytes(64)))
    assert table.latest[peer.peer_id] == later
    again = WitnessTable.decode(table.encode())
    assert again.latest == table.latest and again.conflicts == table.conflicts


def test_the_witness_table_is_bounded():
    table = WitnessTable(max_peers=3)
    peers = [Identity.generate() for _ in range(5)]
    for p in peers:
        table.observe(sign_checkpoint(p, 1, bytes(32), 1))
    assert list(table.latest) == [p.peer_id for p in peers[2:]]


def test_gossiped_checkpoints_reach_the_witness_table_through_the_auditor(peer):
    auditor = Auditor(Reputation(), witnesses=WitnessTable())
    cp = sign_checkpoint(peer, 3, bytes(32), 1)
    assert auditor.observe("sender", checkpoint_message(cp)) == []
    assert auditor.witnesses.latest == {peer.peer_id: cp}
    auditor.observe("sender", {"type": "checkpoint", "checkpoint": {"peer": peer.peer_id}})  # malformed: dropped
    assert Auditor(Reputation()).observe("sender", checkpoint_message(cp)) == []  # a client keeps none


async def test_a_peer_publishes_a_checkpoint_only_when_its_log_grew_and_persists_what_it_witnessed(tmp_path, peer):
    log = write_log(tmp_path / "p.audit.log", peer, 4)
    sent: list[dict] = []
    anchors = Anchors(peer, log, tmp_path / "p.witnesses", 60.0, sent.append)
    await anchors.tick()
    await anchors.tick()
    assert len(sent) == 1
    cp = Checkpoint.from_wire(sent[0]["checkpoint"]).verify()
    assert (cp.peer_id, cp.count, cp.head.hex()) == (peer.peer_id, 4, log.head)
    log.append("verdict", {"i": 4})
    await anchors.tick()
    assert Checkpoint.from_wire(sent[1]["checkpoint"]).count == 5
    other = Identity.generate()
    anchors.witnesses.observe(sign_checkpoint(other, 7, bytes(32), 5))
    await anchors.tick()
    assert load_witnesses(tmp_path / "p.witnesses").latest[other.peer_id].count == 7
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed into place


def test_an_unreadable_witness_store_is_moved_aside_not_trusted(tmp_path):
    path = tmp_path / "w.witnesses"
    write_atomically(path, b"\x93garbage")
    assert load_witnesses(path).latest == {}
    assert not path.exists() and list(tmp_path.glob("w.witnesses.corrupt-*"))


def run_audit(capsys, *args: str) -> tuple[int, str]:
    code = main(["audit", *args])
    return code, capsys.readouterr().out


def test_the_audit_command_checks_against_the_peer_and_the_witnesses(honest, peer, tmp_path, capsys):
    log, cp = honest
    witnesses = WitnessTable()
    witnesses.observe(cp)
    wfile = tmp_path / "other.witnesses"
    write_atomically(wfile, witnesses.encode())
    base = ["--log", str(log.path), "--peer", peer.peer_id]
    code, out = run_audit(capsys, *base, "--witness", str(wfile))
    assert code == 0 and "verified against" in out and "consistent with 1 witnessed checkpoint(s)" in out
    code, out = run_audit(capsys, *base)
    assert code == 0 and "NOT ANCHORED: no witnessed checkpoint" in out
    code = main(["audit", "--log", str(log.path)])  # whose log? never the signer written in it
    assert code == 2 and "give --peer PEER_ID or --key FILE" in capsys.readouterr().err
    cut = tmp_path / "cut.audit.log"
    cut.write_text("".join(line + "\n" for line in log.path.read_text().splitlines()[:6]))
    code, out = run_audit(capsys, "--log", str(cut), "--peer", peer.peer_id, "--witness", str(wfile))
    assert code == 1 and "INVALID" in out and "entries 6-9 were removed" in out
    empty = tmp_path / "empty.audit.log"
    empty.write_text("")
    code, out = run_audit(capsys, "--log", str(empty), "--peer", peer.peer_id, "--witness", str(wfile))
    assert code == 1 and "the log has 0 entries" in out
    forged = tmp_path / "forged.audit.log"
    resign(read_entries(log.path), Identity.generate(), forged)
    code, out = run_audit(capsys, "--log", str(forged), "--peer", peer.peer_id)
    assert code == 1 and "not signed by" in out


def test_the_audit_command_takes_the_peer_from_a_key_file(honest, peer, tmp_path, capsys):
    from p2p_infer.identity import save_identity

    log, _ = honest
    key = tmp_path / "real.key"
    save_identity(peer, key)
    forged = tmp_path / "forged.audit.log"
    resign(read_entries(log.path), Identity.generate(), forged)
    code, out = run_audit(capsys, "--log", str(forged), "--key", str(key))
    assert code == 1 and f"not signed by {peer.peer_id}'s key" in out
    code, out = run_audit(capsys, "--log", str(log.path), "--key", str(key))
    assert code == 0 and f"verified against {peer.peer_id}'s own key" in out
