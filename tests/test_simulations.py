"""Simulations (issue 13): scenario files, the CI scenario on real processes with churn and
liars, a deliberately broken invariant failing its run, and 2 of 3 wrong members."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p_infer.errors import InvariantBroken, ScenarioError
from p2p_infer.sim.runner import simulate
from p2p_infer.sim.scenario import load_scenario

SIMS = Path(__file__).parent.parent / "simulations"
PLOTS = ("latency.png", "reputation.png", "outcomes.png", "routes.png")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_every_scenario_in_simulations_loads():
    for path in SIMS.glob("*.toml"):
        assert load_scenario(path).name, path


@pytest.mark.parametrize("text,named", [
    ('name="x"\nengine="des"\npeers=3\n[churn]\nkil=0.2\n', "kil"),
    ('name="x"\nengine="des"\npeers=3\nseeed=1\n', "seeed"),
    ('name="x"\nengine="des"\npeers="3"\n', "scenario.peers must be int"),
    ('name="x"\nengine="dse"\npeers=3\n', "engine must be one of"),
    ('name="x"\nengine="des"\npeers=3\n[load]\nmode="generation"\n', "'generation' is not built"),
    ('name="x"\nengine="des"\npeers=3\n[adversaries]\nkinds=["liar"]\n', "unknown ['liar']"),
    ('name="x"\nengine="processes"\npeers=3\n[adversaries]\ncollude=true\n', "collude needs engine"),
    ('engine="des"\npeers=3\n', "missing top-level key 'name'"),
    ('name="x"\nengine="processes"\npeers=3\n[network]\nnetem=true\n', "unknown key"),
])
def test_a_bad_scenario_is_refused_by_name(tmp_path, text, named):
    with pytest.raises(ScenarioError, match=named.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_scenario(write(tmp_path, text))


@pytest.mark.slow
@pytest.mark.simulation  # ~3-5 min: make simulate (and .ci/run), not make test
def test_the_ci_scenario_holds_its_invariants_under_churn_and_liars(tmp_path):
    """12 peers, 120 committee queries, 3 peers SIGKILLed and restarted, one liar per shard."""
    report = simulate(SIMS / "ci.toml", tmp_path, progress=False)  # raises InvariantBroken on a broken invariant
    assert report["queries_sent"] >= 100 and report["wrong_accepted"] == 0
    assert report["queries_answered"] / report["queries_sent"] >= 0.99
    assert report["processes_left"] == 0
    kills = [e for e in report["churn_events"] if e["kind"] == "kill"]
    assert len(kills) >= 0.2 * report["peers"] and any(e["kind"] == "ready" for e in report["churn_events"])
    assert report["faults_detected"], "the liars were never caught"
    assert report["final_reputation"]["honest"] > max(v for k, v in report["final_reputation"].items() if k != "honest")
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["invariants_broken"] == [] and "all held" in (tmp_path / "report.md").read_text()
    assert all((tmp_path / p).stat().st_size > 1000 for p in PLOTS)


@pytest.mark.slow
def test_a_client_that_trusts_liars_breaks_the_run(tmp_path):
    """Plain (unverified) queries through peers that lie after their trial: wrong results are
    accepted, and the run fails on its invariant, with the report still written."""
    with pytest.raises(InvariantBroken, match="wrong results accepted"):
        simulate(SIMS / "trust-liar.toml", tmp_path, progress=False, plots=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["wrong_accepted"] > 0 and report["processes_left"] == 0
    assert "BROKEN" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_two_wrong_members_of_three_give_failures_never_wrong_results(tmp_path):
    report = simulate(SIMS / "collude.toml", tmp_path, progress=False, plots=False)
    assert report["wrong_accepted"] == 0 and report["queries_answered"] == 0
    assert set(report["failure_codes"]) == {"no_quorum"} and report["processes_left"] == 0


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def simulate_until_first_peer(scenario: Path, out: Path) -> "subprocess.Popen[bytes]":
    """``p2p-infer simulate`` in its own process group, returned once its first peer is ready."""

    proc = subprocess.Popen([sys.executable, "-m", "p2p_infer.cli", "simulate", str(scenario), "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    deadline = time.monotonic() + 240
    while not (out / "swarm" / "peer0.ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no peer ready"
            proc.kill()
            raise AssertionError(err)
        time.sleep(0.5)
    return proc


@pytest.mark.slow
def test_ctrl_c_mid_run_leaves_nothing_running(tmp_path):

    out = tmp_path / "out"
    proc = simulate_until_first_peer(SIMS / "smoke.toml", out)
    try:
        assert len(processes_mentioning(str(out))) >= 3
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        time.sleep(1)
        assert processes_mentioning(str(out)) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(out)):  # never leave a peer behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
