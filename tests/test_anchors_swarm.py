"""Anchored audit logs across real processes (issue 9): a peer's gossiped checkpoint is kept
by another peer, and ``p2p-infer audit`` with that witness file catches a truncated or
re-signed copy of the log, while the real log passes."""

import time

import pytest

from p2p_infer.identity import Identity
from p2p_infer.ml.models import DigitsMLP
from p2p_infer.node.anchors import load_witness_file
from p2p_infer.node.client import Client
from p2p_infer.proto.audit import AuditLog, read_entries
from p2p_infer.testing.harness import Swarm

pytestmark = pytest.mark.slow


def wait_for_witnessed(swarm: Swarm, witness: str, subject: str, at_least: int, timeout: float = 60.0):
    path = swarm.workdir / f"{witness}.witnesses"
    peer_id = swarm.peers[subject].peer_id
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            latest = load_witness_file(path).latest.get(peer_id)
            if latest is not None and latest.count >= at_least:
                return path, latest
        assert time.monotonic() < deadline, f"{witness} never witnessed a checkpoint of {subject} at >= {at_least} entries"
        time.sleep(0.5)


async def test_a_witnessed_checkpoint_catches_a_truncated_or_re_signed_log(tmp_path):
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        for name in ("h1", "h2", "h3"):  # committees need k >= 3
            swarm.start_peer(name, ["digits-mlp:1-3"], extra_args=["--checkpoint-interval", "1"], wait=False)
        swarm.wait_ready([swarm.peers[n] for n in ("h1", "h2", "h3")], timeout=180)
        swarm.wait_discoverable(timeout=90)
        async with Client([swarm.bootstrap.addr], committee=3, commit_timeout=2.0) as c:
            for i in range(2):  # each member logs the others' commits and reveals, and the client's verdicts
                await c.classify(DigitsMLP.dataset()[2][i].tolist())
        witness_file, checkpoint = wait_for_witnessed(swarm, "h2", "h1", at_least=3)
        h1 = swarm.peers["h1"].peer_id
        log = swarm.workdir / "h1.audit.log"
        lines = log.read_text().splitlines()  # read after the checkpoint: the log only grows
        assert len(lines) >= checkpoint.count

        def audit(path, *extra):
            return swarm.audit("h1", "--witness", str(witness_file), *extra, log=path, check=False)

        honest = audit(log)
        assert honest.returncode == 0 and "consistent with 1 witnessed checkpoint(s)" in honest.stdout, honest.stdout[-500:]
        for keep, name in ((checkpoint.count - 1, "tail"), (checkpoint.count // 2, "half"), (0, "all")):
            cut = tmp_path / f"cut-{name}.log"
            cut.write_text("".join(f"{line}\n" for line in lines[:keep]))
            result = audit(cut)
            assert result.returncode == 1 and f"the log has {keep} entries, but {h1} signed a checkpoint" in result.stdout, name
        forged = tmp_path / "forged.log"
        fake = AuditLog(forged, Identity.generate(), lambda: 0)
        for e in read_entries(log):
            fake.append(e["kind"], e["data"])
        result = audit(forged)
        assert result.returncode == 1 and f"entry 0 is not signed by {h1}'s key" in result.stdout
