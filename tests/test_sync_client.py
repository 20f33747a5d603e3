"""The client from plain scripts and from asyncio (p2p_infer.sync): each script is its own OS
process against a real swarm; no thread is left, nothing is printed unless asked, Ctrl-C works."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from p2p_infer.ml.models import load_model
from p2p_infer.testing.harness import Swarm

pytestmark = pytest.mark.slow
TEXTS = ["The quick brown fox jumps over the lazy dog.", "a", "Volunteers serve contiguous layer ranges of models."]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("sync"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        swarm.start_peer("minilm", ["minilm-l6:1-5"], wait=False)
        swarm.start_peer("smol", ["smollm2-135m:1-29"], wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=240)
        swarm.wait_discoverable(timeout=90)
        yield swarm


def run_script(swarm, body: str, timeout: float = 180) -> subprocess.CompletedProcess:
    script = "import json, sys, threading\nimport p2p_infer\nBOOT = sys.argv[1]\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script, swarm.bootstrap.addr], capture_output=True, text=True,
                          timeout=timeout, env=swarm.env, cwd=swarm.workdir, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def local_embeddings() -> np.ndarray:
    model = load_model("minilm-l6")
    return np.array([model.run_local(t)["embedding"] for t in TEXTS], dtype=np.float32)


def test_plain_script_batch_single_numpy_and_nothing_printed(swarm):
    proc = run_script(swarm, f"""
        TEXTS = {TEXTS!r}
        with p2p_infer.connect(BOOT, unverified=True) as c:
            batch = c.embed(TEXTS)
            single = c.embed(TEXTS[0])
            out = {{"batch": batch.batch, "shape": list(batch.numpy().shape), "dtype": str(batch.numpy().dtype),
                   "single_shape": list(single.numpy().shape), "rows": batch.numpy().tolist(), "one": single.numpy().tolist(),
                   "stages": len(batch.route)}}
        out["threads"] = [t.name for t in threading.enumerate()]
        sys.stdout.write(json.dumps(out))
    """)
    assert proc.stderr == ""  # library mode: no log line unless the application configures logging
    out = json.loads(proc.stdout)  # and stdout holds only what the script wrote
    assert out["batch"] == 3 and out["shape"] == [3, 384] and out["dtype"] == "float32" and out["single_shape"] == [384]
    expected = local_embeddings()
    assert np.abs(np.array(out["rows"]) - expected).max() <= 1e-5
    assert np.abs(np.array(out["one"]) - expected[0]).max() <= 1e-5
    assert out["stages"] >= 1
    assert "p2p-infer-trio" not in out["threads"], out["threads"]  # the loop's thread was joined


def test_asyncio_program_awaits_and_to_thread(swarm):
    proc = run_script(swarm, f"""
        import asyncio
        TEXTS = {TEXTS!r}

        async def main():
            async with p2p_infer.connect(BOOT, unverified=True) as c:
                assert type(c).__name__ == "AsyncioClient"
                both = await asyncio.gather(c.embed(TEXTS[0]), c.embed(TEXTS[1:]))  # two queries at once
                ticks = 0
                async def ticker():  # the event loop keeps running while a query is out
                    nonlocal ticks
                    while True:
                        await asyncio.sleep(0.001)
                        ticks += 1
                task = asyncio.create_task(ticker())
                again = await c.embed(TEXTS[2])
                task.cancel()
                pieces = [p async for p in c.generate("Say hello.", max_new_tokens=3, verified=False)]
            with p2p_infer.connect(BOOT, unverified=True) as s:  # the blocking client, from asyncio via to_thread
                threaded = await asyncio.to_thread(s.embed, TEXTS)
            return {{"first": both[0].numpy().tolist(), "rest": both[1].numpy().tolist(), "third": again.numpy().tolist(),
                    "threaded": threaded.numpy().tolist(), "ticks": ticks,
                    "generated": len(pieces[-1].result.tokens)}}

        out = asyncio.run(main())
        out["threads"] = [t.name for t in threading.enumerate()]
        print(json.dumps(out))
    """)
    assert proc.stderr == ""
    out = json.loads(proc.stdout)
    expected = local_embeddings()
    got = np.array([out["first"], *out["rest"]])
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(np.array(out["third"]) - expected[2]).max() <= 1e-5
    assert np.abs(np.array(out["threaded"]) - expected).max() <= 1e-5
    assert out["ticks"] > 0 and out["generated"] == 3
    assert "p2p-infer-trio" not in out["threads"]


def test_generate_from_a_plain_script_is_an_iterator(swarm):
    proc = run_script(swarm, """
        with p2p_infer.connect(BOOT, unverified=True) as c:
            pieces = list(c.generate("What is the capital of France?", max_new_tokens=6, verified=False))
            early = c.generate("Tell me a joke.", max_new_tokens=50, verified=False)
            first = next(early)
            early.close()  # stopping early cancels the generation in the loop
            after = c.embed("still usable")
        print(json.dumps({"n": len(pieces), "text": "".join(p.text for p in pieces[:-1]), "final": pieces[-1].result.text,
                          "tokens": len(pieces[-1].result.tokens), "first": first.text, "after": after.batch}))
    """, timeout=300)
    out = json.loads(proc.stdout)
    assert out["tokens"] == 6 and out["text"] == out["final"] and out["final"]
    assert out["after"] == 1


def test_ctrl_c_cancels_a_call_and_exits_quickly(swarm):
    script = textwrap.dedent("""
        import sys, threading, time
        import p2p_infer
        try:
            with p2p_infer.connect(sys.argv[1], unverified=True) as c:
                for piece in c.generate("Write a long story about a dragon.", max_new_tokens=400, verified=False):
                    print("piece", flush=True)
        except KeyboardInterrupt:  # out of the with: everything in flight was cancelled on the way
            print("interrupted", time.time(), flush=True)
            assert c.wait_closed(15)  # shielded clean-up (closing the peers' sessions) ends by itself
            print("closed", [t.name for t in threading.enumerate()], flush=True)
            sys.exit(130)
        sys.exit(3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, swarm.bootstrap.addr], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=swarm.env, cwd=swarm.workdir, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "piece", proc.stderr.read() if proc.poll() is not None else ""
        sent = time.time()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)  # the interpreter's own exit (torch teardown) takes seconds more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    interrupted = [line for line in stdout.splitlines() if line.startswith("interrupted")]
    closed = [line for line in stdout.splitlines() if line.startswith("closed")]
    assert interrupted and closed and "p2p-infer-trio" not in closed[0] and "Traceback" not in stderr
    back_in_the_application = float(interrupted[0].split()[1]) - sent  # the call cancelled, the client closed
    assert back_in_the_application < 3, back_in_the_application
