"""Committees across real processes: one misbehaving member per stage for every kind of
fault, two wrong members out of three, certificates checked offline, gossiped evidence."""

import json
import signal  # noqa: F401
import subprocess
import sys
import time

import pytest
import trio

from p2p_infer.node.client import Client
from p2p_infer.proto.consensus import Certificate, NoQuorum
from p2p_infer.testing.harness import Swarm
from p2p_infer.ml.models import DigitsMLP, load_model
from p2p_infer.proto.reputation import updated

from .conftest import TESTS

pytestmark = pytest.mark.slow
ALL = ["digits-mlp:1-1", "digits-mlp:2-2", "digits-mlp:3-3"]
DELAY_MS = 40


def start(swarm: Swarm, peers: dict[str, tuple[list[str], str]], delayed: tuple[str, ...] = ()) -> None:
    """``delayed``: peers whose replies are held DELAY_MS (an emulated link), so the others answer first."""
    swarm.start_bootstrap()
    for name, (serve, fault) in peers.items():
        extra = (["--test-fault", fault] if fault else []) + (["--test-delay-ms", str(DELAY_MS)] if name in delayed else [])
        swarm.start_peer(name, serve, extra_args=extra, wait=False)
    swarm.wait_ready(list(swarm.peers.values()), timeout=180)
    swarm.wait_discoverable(timeout=90)


def sample(i: int) -> list[float]:
    return DigitsMLP.dataset()[2][i].tolist()


def audit_entries(swarm: Swarm, name: str) -> list[dict]:
    out = swarm.audit(name, "--json").stdout
    return json.loads(out)["entries"]


async def wait_for(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.1)


@pytest.fixture(scope="module")
def faults1(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("committee1")) as swarm:
        start(swarm, {
            "h1": (ALL, ""), "h2": (ALL, ""),
            "wrong": (["digits-mlp:1-1"], "wrong-output"),
            "noreveal": (["digits-mlp:2-2"], "no-reveal"),
            "late": (["digits-mlp:3-3"], "late-commit"),
        }, delayed=("h1", "h2"))  # the liar answers first: the next stage starts on its output, and again
        yield swarm


async def test_wrong_output_missing_reveal_and_late_commit_are_outvoted(faults1, tmp_path):
    swarm = faults1
    model = load_model("digits-mlp")
    ids = {name: swarm.peers[name].peer_id for name in ("wrong", "noreveal", "late", "h1", "h2")}
    async with Client([swarm.bootstrap.addr], committee=3, commit_timeout=2.0) as c:
        result = await c.classify(sample(7))
        assert result.output["probabilities"] == pytest.approx(model.run_local(sample(7))["probabilities"], abs=1e-6)
        await result.judged  # a faulty member answering after its stage's quorum is judged after the answer
        verdicts = [s["verdicts"] for s in result.stages]
        assert [(s["first"], s["last"]) for s in result.stages] == [(1, 1), (2, 2), (3, 3)]
        assert verdicts[0][ids["wrong"]] == "wrong-output"
        assert verdicts[1][ids["noreveal"]] == "missing-reveal"
        assert verdicts[2][ids["late"]] == "late-commit"
        for v in verdicts:
            assert v[ids["h1"]] == v[ids["h2"]] == "agree"
        # the rule: +1 task passed (the trial), then one faulty task
        for name in ("wrong", "noreveal", "late"):
            assert c.reputation.of(ids[name]) == pytest.approx(updated(updated(1.0, False), True))
        # honest members: trial + 3 good stages
        assert c.reputation.of(ids["h1"]) == pytest.approx(1.01 ** 4)
        cert_path = tmp_path / "q.cert"
        cert_path.write_bytes(result.certificate)
    # the certificate verifies offline, in another process, with nothing but the file
    assert swarm.cli("verify", str(cert_path)).returncode == 0
    cert = Certificate.decode(cert_path.read_bytes())
    assert len(cert.stages) == 3 and all(len(s.commits) == 2 for s in cert.stages)
    # evidence and verdicts reached other peers by gossip, into their audit logs
    deadline = time.monotonic() + 40
    while True:
        entries = audit_entries(swarm, "bootstrap")
        evidence = [e for e in entries if e["kind"] == "evidence" and e["data"]["member"] == ids["wrong"]]
        verdict_members = {m for e in entries if e["kind"] == "verdict" for m, v in e["data"]["verdicts"].items() if v != "agree"}
        if evidence and {ids["noreveal"], ids["late"]} <= verdict_members:
            break
        assert time.monotonic() < deadline, f"gossip did not reach the bootstrap audit log: {[e['kind'] for e in entries]}"
        time.sleep(0.5)
    assert evidence[0]["data"]["kind"] == "wrong-output"
    rep = [e for e in entries if e["kind"] == "reputation" and e["data"]["peer"] == ids["wrong"]]
    assert rep and rep[0]["data"]["after"] == pytest.approx(0.8)  # an observer's own table: one faulty task


def test_tampered_certificate_fails_verification(faults1, tmp_path):
    result = faults1.cli("query", "--model", "digits-mlp", "--committee", "3", "--commit-timeout", "2",
                         "--save-cert", str(tmp_path / "c.cert"), "--save-output", str(tmp_path / "c.out"),
                         "--save-input", str(tmp_path / "c.in"), "--json", "test:3")
    data = json.loads(result.stdout)
    assert len(data["stages"]) == 3
    raw = (tmp_path / "c.cert").read_bytes()
    assert faults1.cli("verify", str(tmp_path / "c.cert")).returncode == 0
    check = faults1.cli("verify", str(tmp_path / "c.cert"), "--output", str(tmp_path / "c.out"), "--input", str(tmp_path / "c.in"))
    assert "is the certified output" in check.stdout
    wrong = check_output_mismatch(faults1, tmp_path)
    assert wrong.returncode == 1 and "INVALID: the output is not the one the certificate accepted" in wrong.stdout
    for pos in (40, len(raw) // 3, len(raw) // 2, len(raw) - 100):
        tampered = bytearray(raw)
        tampered[pos] ^= 0x04
        (tmp_path / "t.cert").write_bytes(bytes(tampered))
        check = faults1.cli("verify", str(tmp_path / "t.cert"), check=False)
        assert check.returncode == 1 and "INVALID" in check.stdout, pos


def check_output_mismatch(swarm: Swarm, tmp_path) -> "subprocess.CompletedProcess[str]":
    """verify --output with the certified output changed in its last byte."""
    import msgpack

    saved = msgpack.unpackb((tmp_path / "c.out").read_bytes())
    data = bytearray(saved["hidden"]["data"])
    data[-1] ^= 0x01
    saved["hidden"]["data"] = bytes(data)
    (tmp_path / "w.out").write_bytes(msgpack.packb(saved, use_bin_type=True))
    return swarm.cli("verify", str(tmp_path / "c.cert"), "--output", str(tmp_path / "w.out"), check=False)


def test_audit_log_tampering_is_detected(faults1, tmp_path):
    log = faults1.workdir / "h1.audit.log"
    assert faults1.audit("h1").returncode == 0
    lines = log.read_text().splitlines()
    assert len(lines) > 3
    entry = json.loads(lines[1])
    entry["data"]["member"] = "someone-else"
    copy = tmp_path / "tampered.log"
    copy.write_text("\n".join([lines[0], json.dumps(entry), *lines[2:]]) + "\n")
    result = faults1.audit("h1", log=copy, check=False)
    assert result.returncode == 1 and "entry 1" in result.stdout


async def test_a_stage_started_on_a_wrong_first_answer_is_started_again_from_the_decided_output(faults1, tmp_path):
    """Speculation: stage 2 starts on stage 1's first valid answer. The liar answers first
    whenever it is in stage 1's quorum (the honest peers' replies are delayed); its output is
    outvoted, stage 2 is started again from the decided output, and the abandoned run judges
    nobody. Each query is a fresh client (the liar stays trusted; 2/3 of draws put it first)."""
    h1 = faults1.peers["h1"].peer_id
    c, result = await query_until_stage_2_restarts(faults1)
    restarts = [s["restarts"] for s in result.stages]
    assert restarts == [0, 1, 0], restarts
    assert c.reputation.of(h1) == pytest.approx(1.01 ** 4)  # trial + 3 stages: the abandoned stage 2 judged nobody
    cert = Certificate.decode(result.certificate)
    assert len(cert.verify()) == 3  # the restarted stage's input is stage 1's certified output


async def query_until_stage_2_restarts(swarm: Swarm, tries: int = 12) -> tuple[Client, object]:
    """Committee queries, each from a fresh client (the liar stays trusted; 2/3 of draws put
    it in stage 1's quorum, where it answers first), each result right, until one query's
    stage 2 was started again; that query's client and result (the last one if none was)."""
    model = load_model("digits-mlp")
    for i in range(tries):
        async with Client([swarm.bootstrap.addr], committee=3, commit_timeout=2.0) as c:
            result = await c.classify(sample(i))
            assert result.output["probabilities"] == pytest.approx(model.run_local(sample(i))["probabilities"], abs=1e-6)
            await result.judged
            if result.stages[1]["restarts"]:
                break
    return c, result


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("committee-shape")) as swarm:
        start(swarm, {
            "h1": (ALL, ""), "h2": (ALL, ""), "h3": (ALL[1:], ""),
            "shape": (["digits-mlp:1-1"], "wrong-shape"),
        }, delayed=("h1", "h2"))  # stage 1's liar answers first, and stage 2 is started on its output
        yield swarm


async def test_a_stage_that_fails_on_a_wrong_first_answer_is_started_again_not_failed(shaped):
    """Speculation: stage 2 is started on stage 1's first valid answer, which is shaped so
    that every stage-2 member refuses it. That stage's failure must not stand (its input was
    never confirmed): once stage 1 decides on the honest output, stage 2 starts again from it
    and the query succeeds; the members that refused the bad input are judged by nobody."""
    ids = {name: shaped.peers[name].peer_id for name in ("h1", "h2", "h3", "shape")}
    c, result = await query_until_stage_2_restarts(shaped)
    restarts = [s["restarts"] for s in result.stages]
    assert restarts[0] == restarts[2] == 0 and restarts[1] >= 1, restarts
    assert result.stages[0]["verdicts"][ids["shape"]] == "wrong-output"
    stages_served = {"h1": 3, "h2": 3, "h3": 2}
    for name, served in stages_served.items():  # the abandoned stage 2 judged nobody: trial + one good task per stage
        assert c.reputation.of(ids[name]) == pytest.approx(1.01 ** (1 + served))
    cert = Certificate.decode(result.certificate)
    assert len(cert.verify()) == 3


@pytest.fixture(scope="module")
def faults2(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("committee2")) as swarm:
        start(swarm, {
            "h1": (ALL, ""), "h2": (ALL, ""),
            "copier": (["digits-mlp:1-1"], "copy"),
            "liar": (["digits-mlp:2-2"], "equivocate"),
            "h3": (["digits-mlp:3-3"], ""),
        })
        yield swarm


async def test_copier_and_equivocator_are_caught(faults2, tmp_path):
    swarm = faults2
    model = load_model("digits-mlp")
    copier, liar = swarm.peers["copier"].peer_id, swarm.peers["liar"].peer_id
    async with Client([swarm.bootstrap.addr], committee=3, commit_timeout=2.0) as c:
        result = await c.classify(sample(11))
        assert result.output["class"] == model.run_local(sample(11))["class"]
        await result.judged
        # members gossip a round only after the commit deadline: the copier finds nothing to
        # copy in time, commits to its zeros and is outvoted
        assert result.stages[0]["verdicts"][copier] == "wrong-output"
        # the liar sent the client one commitment and gossiped another: caught from gossip
        await wait_for(lambda: c.reputation.of(liar) < 1.0)
        assert c.reputation.of(liar) == pytest.approx(updated(updated(1.0, False), True))
        assert c.reputation.of(copier) == pytest.approx(updated(updated(1.0, False), True))
        Certificate.decode(result.certificate).verify()
    deadline = time.monotonic() + 40
    while True:
        kinds = {(e["data"]["kind"], e["data"]["member"]) for e in audit_entries(swarm, "h3") if e["kind"] == "evidence"}
        if {("wrong-output", copier), ("equivocation", liar)} <= kinds:
            break
        assert time.monotonic() < deadline, kinds
        time.sleep(0.5)


async def test_two_wrong_members_of_three_give_no_result(tmp_path):
    with Swarm(tmp_path) as swarm:
        start(swarm, {"h": (ALL, ""), "w1": (ALL, "wrong-output"), "w2": (ALL, "wrong-output")})  # every stage has 3 providers, or the query is refused before it is sent (CannotVerify)
        async with Client([swarm.bootstrap.addr], committee=3, commit_timeout=2.0, max_reruns=1) as c:
            with pytest.raises(NoQuorum, match=r"stage 0 \(layers 1-1\) failed after 2 attempt"):
                await c.classify(sample(0))


def wait_file(path, proc, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (path.parent / "framer.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)
    return json.loads(path.read_text())


async def test_an_outsider_cannot_frame_an_honest_member(tmp_path):
    """Issue 9, over real processes: a peer on no committee (tests/framer.py, written from the
    spec) sends execute for tasks it made up, then gossips wrong-output evidence built from
    the victim's real signed round. The victim refuses; every auditor refuses the evidence
    (a valid control reaches them all); the victim's reputation moves nowhere."""
    with Swarm(tmp_path) as swarm:
        start(swarm, {name: (["digits-mlp:1-3"], "") for name in ("h1", "h2", "h3")})
        victim = swarm.peers["h1"].peer_id
        ready, report = tmp_path / "framer.ready", tmp_path / "framer.report"
        with open(tmp_path / "framer.log", "wb") as log:
            leaked = tmp_path / "leaked.out"  # topic v6 rounds carry no output: the framer is handed it
            proc = subprocess.Popen([sys.executable, str(TESTS / "framer.py"), swarm.bootstrap.addr, victim, str(ready), str(report),
                                     str(leaked)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            refusals = wait_file(ready, proc, 90)["refusals"]
            assert all("not_selected" in r for r in refusals), refusals
            assert "below the minimum of 3" in refusals[0] and "does not solve the puzzle" in refusals[1], refusals
            async with Client([swarm.bootstrap.addr], committee=3, commit_timeout=2.0) as c:
                result = await c.classify(sample(5))
                await result.judged
                assert set(result.stages[0]["verdicts"].values()) == {"agree"}
                leaked.write_bytes(c.last_certified["output"])
                before = c.reputation.of(victim)
                control = wait_file(report, proc, 90)["control"]
                await wait_for(lambda: c.reputation.of(control) < 1.0, timeout=40)  # the framer's gossip reached us
                assert c.reputation.of(victim) == before
            deadline = time.monotonic() + 40
            for name in ("bootstrap", "h1", "h2", "h3"):
                while True:
                    entries = audit_entries(swarm, name)
                    if any(e["kind"] == "evidence" and e["data"]["member"] == control for e in entries):
                        break
                    assert time.monotonic() < deadline, f"control evidence never reached {name}"
                    time.sleep(0.5)
                assert not [e for e in entries if e["kind"] == "evidence" and e["data"]["member"] == victim], name
                assert not [e for e in entries if e["kind"] == "reputation" and e["data"]["peer"] == victim], name
        finally:
            proc.kill()
            proc.wait(timeout=10)


async def test_spot_checks_catch_a_peer_that_lies_after_its_trial(tmp_path):
    with Swarm(tmp_path) as swarm:
        start(swarm, {"honest": (["digits-mlp:1-3"], ""), "liar": (["digits-mlp:1-3"], "lie-after-trial")})
        liar = swarm.peers["liar"].peer_id
        model = load_model("digits-mlp")
        caught = 0
        async with Client([swarm.bootstrap.addr], spot_check=1.0) as c:
            for i in range(12):
                result = await c.classify(sample(i))
                assert result.output["probabilities"] == pytest.approx(model.run_local(sample(i))["probabilities"], abs=1e-6)
                caught += sum(liar in ch.get("wrong", []) for ch in result.spot_checks)
            assert caught >= 1
            assert c.reputation.of(liar) < 1.0
