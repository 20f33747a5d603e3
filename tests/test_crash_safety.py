"""Files survive a kill at any point: a torn audit-log tail is repaired at start, never a
refusal to start (key-file creation is covered in test_identity.py)."""

import json
import signal

import pytest

from p2p_infer.clock import now_ms
from p2p_infer.identity import Identity
from p2p_infer.proto.audit import AuditLog, verify_log
from p2p_infer.testing.harness import Swarm


def _log_with_torn_tail(path, identity, entries=3):
    log = AuditLog(path, identity, now_ms)
    for i in range(entries):
        log.append("verdict", {"i": i})
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"seq": 3, "time_ms": 17, "kind": "verd')  # killed mid-write
    return whole


def test_torn_tail_is_moved_aside_and_the_chain_continues(tmp_path):
    path, ident = tmp_path / "a.audit.log", Identity.generate()
    whole = _log_with_torn_tail(path, ident)
    log = AuditLog(path, ident, now_ms)
    assert log.repaired is not None and log.repaired.read_bytes().startswith(b'{"seq": 3')
    assert path.read_bytes() == whole and log.seq == 3
    log.append("verdict", {"i": 3})
    assert [e["data"]["i"] for e in verify_log(path)] == [0, 1, 2, 3]


def test_a_log_that_is_only_a_torn_line_restarts_empty(tmp_path):
    path = tmp_path / "a.audit.log"
    path.write_bytes(b'{"seq": 0, "ti')
    log = AuditLog(path, Identity.generate(), now_ms)
    assert log.seq == 0 and path.read_bytes() == b"" and log.repaired is not None


def test_whole_logs_are_left_alone(tmp_path):
    path, ident = tmp_path / "a.audit.log", Identity.generate()
    AuditLog(path, ident, now_ms).append("verdict", {})
    assert AuditLog(path, ident, now_ms).repaired is None


@pytest.mark.slow
def test_peer_restarts_after_sigkill_with_a_torn_audit_tail(tmp_path):
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        peer = swarm.start_peer("p", [])
        audit = tmp_path / "p.audit.log"
        peer.proc.send_signal(signal.SIGKILL)
        peer.proc.wait(10)
        ident_seed = peer.key_file.read_bytes()[4:]
        _log_with_torn_tail(audit, Identity.from_seed(ident_seed))
        swarm.peers.pop("p")
        again = swarm.start_peer("p", [])
        assert again.info["peer_id"] == Identity.from_seed(ident_seed).peer_id
        assert list(tmp_path.glob("p.audit.log.torn-*"))
        assert json.loads(swarm.audit("p", "--json", log=audit).stdout)["entries"]


def _small_log(path, identity, **kw):
    return AuditLog(path, identity, now_ms, **kw)


def test_audit_log_rotates_by_size_and_the_chain_spans_the_files(tmp_path):
    path, ident = tmp_path / "a.audit.log", Identity.generate()
    log = _small_log(path, ident, max_bytes=2000, budget_bytes=10**9)
    for i in range(40):
        log.append("verdict", {"i": i})
    from p2p_infer.proto.audit import rotated_files

    assert len(rotated_files(path)) >= 3 and all(f.stat().st_size <= 2000 for f in rotated_files(path))
    assert [e["data"]["i"] for e in verify_log(path)] == list(range(40))
    again = _small_log(path, ident, max_bytes=2000, budget_bytes=10**9)  # reopening continues the chain
    again.append("verdict", {"i": 40})
    assert [e["seq"] for e in verify_log(path)] == list(range(41))


def test_audit_log_disk_budget_deletes_oldest_files_and_says_so(tmp_path):
    from p2p_infer.errors import AuditError
    from p2p_infer.proto.audit import rotated_files

    path, ident = tmp_path / "a.audit.log", Identity.generate()
    log = _small_log(path, ident, max_bytes=2000, budget_bytes=6000)
    for i in range(200):
        log.append("verdict", {"i": i})
    files = rotated_files(path)
    assert sum(f.stat().st_size for f in files) <= 6000 + 2000
    entries = verify_log(path)  # starts past 0, vouched for by a signed "pruned" entry
    assert entries[0]["seq"] > 0 and entries[-1]["data"] == {"i": 199}
    assert any(e["kind"] == "pruned" for e in entries)
    files[0].unlink()  # removing a file by hand is still caught
    with pytest.raises(AuditError, match="no pruned entry"):
        verify_log(path)
