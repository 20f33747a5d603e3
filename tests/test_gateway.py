"""The OpenAI-compatible gateway over a real swarm: three MiniLM peers (a committee of 3
per stage, the default) of which two also serve SmolLM2 (verified generation needs a
second provider per span), a gateway process, and the ``openai`` client pointed at it.
Answers are compared with the same weights run in this process."""

import base64
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2p_infer.gateway import schemas
from p2p_infer.errors import InvalidApiRequest, UnknownModel
from p2p_infer.ml.models import known_manifests, load_model
from p2p_infer.ml.smollm2 import generate_local
from p2p_infer.proto.consensus import Certificate
from p2p_infer.proto.sampling import Sampling
from p2p_infer.testing.harness import PeerProcess, Swarm

PROMPT = "What is the capital of France?"


def start_gateway(swarm: Swarm, name: str = "gateway", extra: list[str] | None = None, timeout: float = 240) -> tuple[PeerProcess, str]:
    """A gateway process joined to the swarm, stopped with it; returns it and its URL."""
    ready = swarm.workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    proc = swarm.start_tool(name, "p2p_infer.cli", ["gateway", "--bootstrap", swarm.bootstrap.addr, "--listen", "127.0.0.1:0",
                                                    "--ready-file", str(ready), "--log-format", "json", *(extra or [])])
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.alive(), f"gateway exited {proc.proc.returncode}:\n{proc.log_tail()}"
        assert time.monotonic() < deadline, f"gateway not ready after {timeout} s:\n{proc.log_tail()}"
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())["url"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("gw"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        for i in range(3):
            serve = ["minilm-l6:1-5"] + (["smollm2-135m:1-29"] if i < 2 else [])
            swarm.start_peer(f"p{i}", serve, wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=400)
        swarm.wait_discoverable(timeout=120)
        yield swarm


@pytest.fixture(scope="module")
def gateway(swarm):
    proc, url = start_gateway(swarm)
    yield url


@pytest.fixture(scope="module")
def api(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm-l6")


# ---- request parsing, no network ----


def test_requests_are_parsed_or_refused_by_name():
    req = schemas.parse_embeddings({"model": "minilm-l6", "input": "hi"})
    assert req.single and req.inputs == ["hi"] and req.encoding_format == "float" and not req.unverified
    assert schemas.parse_embeddings({"model": "minilm-l6", "input": ["a", "b"], "p2p_infer": {"unverified": True}}).unverified
    cases = [({"model": "minilm-l6", "input": [1, 2]}, "input"), ({"model": "minilm-l6", "input": "x", "n": 2}, "n"),
             ({"model": "minilm-l6", "input": "x", "encoding_format": "hex"}, "encoding_format"),
             ({"model": "minilm-l6", "input": "x", "p2p_infer": {"fast": True}}, "p2p_infer")]
    for body, param in cases:
        with pytest.raises(InvalidApiRequest) as caught:
            schemas.parse_embeddings(body)
        assert caught.value.param == param and schemas.error_of(caught.value)[0] == 400
    with pytest.raises(UnknownModel):
        schemas.parse_embeddings({"model": "text-embedding-3-small", "input": "x"})
    chat = schemas.parse_chat({"model": "smollm2-135m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                               "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 7, "temperature": 0})
    assert chat.messages == [{"role": "user", "content": "hi"}] and chat.include_usage and chat.max_tokens == 7
    for body, param in [({"model": "smollm2-135m", "messages": []}, "messages"),
                        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "stop": ["."]}, "stop"),
                        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature")]:
        with pytest.raises(InvalidApiRequest) as caught:
            schemas.parse_chat(body)
        assert caught.value.param == param


@pytest.mark.slow
def test_gateway_refuses_its_mistakes_in_one_line(tmp_path):
    import subprocess
    import sys

    from p2p_infer.identity import Identity

    nobody = f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}"
    cases = [(["--listen", "0.0.0.0:8000", "--bootstrap", nobody], 2, "is not a loopback address"),
             (["--listen", "127.0.0.1:http", "--bootstrap", nobody], 2, "expected HOST:PORT"),
             (["--listen", "127.0.0.1:0", "--bootstrap", nobody], 1, "no bootstrap peer reachable")]
    for argv, code, words in cases:
        run = subprocess.run([sys.executable, "-m", "p2p_infer.cli", "gateway", *argv], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        last = run.stderr.strip().splitlines()[-1]  # after any log line of the client's join
        assert run.returncode == code and last.startswith("error: ") and words in last, run.stderr
        assert "Traceback" not in run.stderr


# ---- embeddings ----


@pytest.mark.slow
def test_embeddings_through_the_openai_client_are_verified(api, minilm):
    texts = ["hello, decentralized world", "a second sentence"]
    resp = api.embeddings.create(model="minilm-l6", input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in resp.data] == [0, 1] and resp.model == "minilm-l6" and resp.usage.prompt_tokens > 4
    for d, text in zip(resp.data, texts):
        local = minilm.run_local(text)["embedding"]
        assert len(d.embedding) == 384 and max(abs(a - b) for a, b in zip(d.embedding, local)) < 1e-5
    ev = resp.model_extra["p2p_infer"]
    assert ev["verified"] is True and len(ev["inputs"]) == 2
    layers = {mid: m.num_layers for mid, m in known_manifests().items()}
    for one in ev["inputs"]:
        assert one["verified"] and one["mode"] == "committee k=3"
        assert all(stage["check"] == "committee k=3" and stage["verified"] for stage in one["verification"])
        cert = Certificate.decode(base64.b64decode(one["certificate"]))
        assert cert.verify(known_layers=lambda mid: layers[mid])  # offline, as `p2p-infer verify` does
    single = api.embeddings.create(model="minilm-l6", input=texts[0], encoding_format="float")
    assert single.data[0].embedding == pytest.approx(resp.data[0].embedding, abs=1e-5)
    assert single.model_extra["p2p_infer"]["verified"] and single.model_extra["p2p_infer"]["certificate"]


@pytest.mark.slow
def test_unverified_only_when_asked_and_labelled(api, minilm):
    resp = api.embeddings.create(model="minilm-l6", input="plain routing", extra_body={"p2p_infer": {"unverified": True}})
    ev = resp.model_extra["p2p_infer"]
    assert ev["verified"] is False and ev["certificate"] is None
    assert ev["verification"] and all(s["check"] == "none" and not s["verified"] for s in ev["verification"])
    local = minilm.run_local("plain routing")["embedding"]
    assert max(abs(a - b) for a, b in zip(resp.data[0].embedding, local)) < 1e-5


@pytest.mark.slow
def test_errors_in_openai_format(api, gateway):
    with pytest.raises(openai.NotFoundError) as missing:
        api.embeddings.create(model="text-embedding-3-small", input="x")
    assert missing.value.code == "model_not_found" and missing.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}], n=2)
    assert bad.value.body["param"] == "n" and bad.value.code == "invalid_request"
    raw = httpx.post(f"{gateway}/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    nowhere = httpx.get(f"{gateway}/v1/nothing", timeout=30)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "not_found_error"


# ---- chat ----


@pytest.mark.slow
def test_streaming_chat_is_the_monolithic_answer_and_verified(api):
    smol = load_model("smollm2-135m")
    tokens = generate_local(smol, smol.prompt_ids(PROMPT), 12, Sampling())
    expected = smol.tokenizer.decode(tokens, skip_special_tokens=True)
    stream = api.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": PROMPT}], stream=True,
                                         max_tokens=12, temperature=0, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3  # streamed, not one piece
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == ("stop" if tokens[-1] in smol.eos_ids() else "length")
    ev = final[0].model_extra["p2p_infer"]
    assert ev["verified"] is True and ev["mode"] == "verified" and all(s["agreed"] for s in ev["verification"]["spans"])
    assert [(h["first"], h["last"]) for h in ev["route"]] == [(1, 29)]
    assert chunks[-1].usage.completion_tokens == len(tokens) and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


@pytest.mark.slow
def test_chat_without_stream(api):
    smol = load_model("smollm2-135m")
    tokens = generate_local(smol, smol.prompt_ids(PROMPT), 5, Sampling())
    expected = smol.tokenizer.decode(tokens, skip_special_tokens=True)
    resp = api.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
                                       temperature=0)
    assert resp.choices[0].message.content == expected and resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens == len(tokens) == 5 and resp.object == "chat.completion"
    assert resp.choices[0].finish_reason == "length"
    assert resp.model_extra["p2p_infer"]["verified"] is True


# ---- models, health, metrics ----


@pytest.mark.slow
def test_models_health_and_metrics(api, gateway, swarm):
    models = {m.id: m for m in api.models.list()}
    assert set(models) == {"minilm-l6", "smollm2-135m"}
    assert models["minilm-l6"].model_extra["p2p_infer"]["min_providers"] == 3
    assert models["smollm2-135m"].model_extra["p2p_infer"]["min_providers"] == 2
    health = httpx.get(f"{gateway}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["peers"] >= 3 and all(m["verifiable"] for m in health.json()["models"].values())
    api.embeddings.create(model="minilm-l6", input="counted")
    assert httpx.post(f"{gateway}/v1/embeddings", json={"model": "minilm-l6"}, timeout=30).status_code == 400
    text = httpx.get(f"{gateway}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    done = [s for s in families["p2p_infer_requests"].samples
            if s.name.endswith("_total") and s.labels["protocol"] == "/v1/embeddings" and s.labels["code"] == "200"]
    assert done and done[0].value >= 1
    failed = [s for s in families["p2p_infer_requests"].samples
              if s.name.endswith("_total") and s.labels["protocol"] == "/v1/embeddings" and s.labels["code"] == "400"]
    assert failed and failed[0].value >= 1
    latency = [s for s in families["p2p_infer_request_seconds"].samples
               if s.name.endswith("_count") and s.labels["protocol"] == "/v1/embeddings"]
    assert latency and latency[0].value >= done[0].value
    assert [s.value for s in families["p2p_infer_connections"].samples][0] >= 1
    assert {s.labels["peer"] for s in families["p2p_infer_reputation"].samples} >= {p.peer_id for p in swarm.serving()}
