"""Verified by default, and optimistic mode, across real processes (issue 9).

One swarm: three providers of digits-mlp layers 1-3, one of them a consistent liar (honest
on each client's trial, wrong on every later plain reply and in every committee), and two
(honest) providers only of minilm-l6. A default ``p2p-infer query`` (the CLI, in a subprocess) never
exits 0 with a wrong answer; too few providers -> exit 1 naming the stage; ``--unverified``
-> exit 0 labelled UNVERIFIED; optimistic mode catches the liar with evidence."""

import functools
import json
import random
import time

import numpy as np
import pytest

from p2p_infer.config import default_cache_dir
from p2p_infer.ml.models import DigitsMLP, load_model
from p2p_infer.node.client import Client
from p2p_infer.testing.harness import Swarm

pytestmark = pytest.mark.slow
DIGITS = "digits-mlp:1-3"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("vdefault")) as swarm:
        swarm.start_bootstrap()
        swarm.start_peer("h1", [DIGITS, "minilm-l6:1-5"], wait=False)
        swarm.start_peer("h2", [DIGITS, "minilm-l6:1-5"], wait=False)
        swarm.start_peer("liar", [DIGITS], extra_args=["--test-fault", "consistent-liar"], wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=240)
        swarm.wait_discoverable(timeout=120)
        yield swarm


@functools.cache
def local_probabilities(i: int) -> list[float]:
    model = load_model("digits-mlp", default_cache_dir())
    return model.run_local(DigitsMLP.dataset()[2][i].tolist())["probabilities"]


def test_a_default_query_through_a_liar_is_right_or_fails_loudly(swarm):
    answered = 0
    for i in range(3):
        run = swarm.cli("query", "--model", "digits-mlp", "--json", f"test:{i}", check=False, timeout=180)
        if run.returncode != 0:  # failing is allowed, but loudly and never with an answer
            assert run.stdout.strip() == "" and "error:" in run.stderr, (run.stdout, run.stderr)
            continue
        out = json.loads(run.stdout)
        assert out["verified"] is True and out["mode"] == "committee k=3"
        assert [s["check"] for s in out["verification"]] == ["committee k=3"] and out["verification"][0]["verified"]
        assert np.allclose(out["output"]["probabilities"], local_probabilities(i), atol=1e-4)  # the right answer
        answered += 1
    assert answered >= 1, "two honest providers of three: the committee must answer"


def test_too_few_providers_fails_before_sending_and_names_the_stage(swarm):
    run = swarm.cli("query", "--model", "minilm-l6", "hello there", check=False)
    assert run.returncode == 1 and run.stdout.strip() == ""
    assert "cannot verify minilm-l6 layers 1-5: found 2 provider(s)" in run.stderr, run.stderr
    assert "a committee of 3 needs 3" in run.stderr and "--unverified" in run.stderr


def test_unverified_must_be_asked_for_and_is_labelled(swarm):
    run = swarm.cli("query", "--model", "minilm-l6", "--unverified", "hello there")
    assert "UNVERIFIED" in run.stdout
    out = json.loads(swarm.cli("query", "--model", "minilm-l6", "--unverified", "--json", "hello there").stdout)
    assert out["verified"] is False and [s["check"] for s in out["verification"]] == ["none"]
    refused = swarm.cli("query", "--model", "minilm-l6", "--forwarding", "hello there", check=False)
    assert refused.returncode == 2 and "--unverified" in refused.stderr  # forwarding alone is not verified (a usage error)


async def test_optimistic_mode_catches_the_liar_with_evidence(swarm):
    liar = swarm.peers["liar"].peer_id
    x = DigitsMLP.dataset()[2]
    async with Client([swarm.bootstrap.addr], optimistic=1.0, check_rng=random.Random(9), request_timeout=20.0) as c:
        c.admission.retrial = 0.0  # what catches it must be the optimistic check, not a later trial
        reports = []
        for i in range(6):
            result = await c.classify(x[i].tolist())
            assert result.verified is False and result.verification[0]["check"] == "optimistic p=1"
            report = await result.check  # the answer came first; its check finishes now
            reports.append((result.route[0].peer, report, result.output["probabilities"], i))
            if any(st["wrong"] == liar for st in report["stages"]):  # caught (gossiped committee evidence may move it too)
                break
        stage_reports = [r["stages"][0] for _, r, _, _ in reports]
        assert all(s["checked"] and s["executor"] == peer for s, (peer, _, _, _) in zip(stage_reports, reports))
        caught = [s for s in stage_reports if s["wrong"] == liar]
        assert caught, stage_reports
        assert all(s["wrong"] in ("", liar) for s in stage_reports)  # no honest peer is ever accused
        for peer, report, probabilities, i in reports:
            right = np.allclose(probabilities, local_probabilities(i), atol=1e-4)
            assert report["mismatch"] is (not right) and right is (peer != liar), (peer, report)
        [evidence] = result.check.evidence  # the last query's: signed, checkable offline
        evidence.verify()
        assert evidence.member == liar and len(evidence.witnesses) == 2 and liar not in [w.executor for w, _ in evidence.witnesses]
        assert c.reputation.outcomes[(liar, evidence.accused.task_id)] is True  # the client's table acted on it
    # gossiped: an honest peer's auditor checked it and logged it, with its own reputation change
    task = evidence.accused.task_id.hex()
    deadline = time.monotonic() + 40
    while True:
        entries = json.loads(swarm.audit("h1", "--json").stdout)["entries"]
        found = [e for e in entries if e["kind"] == "evidence" and e["data"]["task"] == task]
        if found:
            break
        assert time.monotonic() < deadline, "optimistic evidence did not reach h1's audit log"
        time.sleep(0.5)
    assert found[0]["data"]["kind"] == "optimistic-wrong-output" and found[0]["data"]["member"] == liar
    assert any(e["kind"] == "reputation" and e["data"]["peer"] == liar and e["data"]["reason"] == "optimistic-wrong-output"
               for e in entries)


async def test_an_optimistic_check_of_a_sequence_model_agrees(swarm):
    """MiniLM's stages carry an attention mask: the re-execution sends it as the executor got it."""
    async with Client([swarm.bootstrap.addr], optimistic=1.0, check_rng=random.Random(1)) as c:
        result = await c.embed("two honest providers of every layer")
        report = await result.check
    assert [s["outcome"] for s in report["stages"]] == ["agree"] and not report["mismatch"], report


def test_the_cli_waits_for_the_optimistic_check(swarm):
    run = swarm.cli("query", "--model", "digits-mlp", "--optimistic", "1", "test:5", check=False, timeout=180)
    assert "OPTIMISTIC (optimistic p=1)" in run.stdout and "optimistic check ran" in run.stdout, run.stdout
    liar_executed = swarm.peers["liar"].peer_id in run.stdout.split("optimistic check: running")[0]
    assert run.returncode == (1 if liar_executed else 0), (run.stdout, run.stderr)
    if liar_executed:
        assert "MISMATCH" in run.stdout and "evidence against" in run.stdout
