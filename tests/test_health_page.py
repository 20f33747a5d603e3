"""The gateway's health page (``GET /``) loaded in headless Debian chromium: what it shows
(peers, coverage per model and layer, recent queries and their verification) must be what
the gateway's JSON endpoints say. A swarm of three MiniLM peers and no SmolLM2 peer, so
the chat model shows as uncovered and a chat request fails."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import httpx
import openai
import pytest

from p2p_infer.testing.harness import Swarm

from .test_gateway import start_gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")]


class Elements(HTMLParser):
    """Every element's tag, attributes and own text, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.found.append(element)
        if tag not in ("meta", "link", "br", "img", "input"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        if self._open:
            self._open[-1]["text"] += data

    def with_attr(self, name: str) -> list[dict]:
        return [e for e in self.found if name in e["attrs"]]


def dump_dom(url: str, profile) -> Elements:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
            f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    page = Elements()
    page.feed(run.stdout)
    return page


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with Swarm(tmp_path_factory.mktemp("health"), record_ttl=30) as swarm:
        swarm.start_bootstrap()
        for i in range(3):
            swarm.start_peer(f"p{i}", ["minilm-l6:1-5"], wait=False)
        swarm.wait_ready(list(swarm.peers.values()), timeout=300)
        swarm.wait_discoverable(timeout=120)
        yield swarm


def test_health_page_shows_what_the_api_says(swarm, tmp_path):
    _, url = start_gateway(swarm)
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=180)
    api.embeddings.create(model="minilm-l6", input="a verified query")
    api.embeddings.create(model="minilm-l6", input="an unverified one", extra_body={"p2p_infer": {"unverified": True}})
    with pytest.raises(openai.APIStatusError) as failed:  # no SmolLM2 peer: refused, and listed with its error
        api.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert failed.value.status_code == 503

    page = dump_dom(f"{url}/", tmp_path / "profile")
    net = httpx.get(f"{url}/api/network", timeout=30).json()
    health = httpx.get(f"{url}/health", timeout=30)
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    body = [e for e in page.found if e["tag"] == "body"][0]
    assert body["attrs"]["data-loaded"] == "true" and body["attrs"]["data-peers"] == str(len(net["peers"]))
    status = [e for e in page.found if e["attrs"].get("id") == "status"][0]
    assert health.status_code == 503 and status["text"] == health.json()["status"] == "degraded"  # chat is not covered

    shown_peers = {e["attrs"]["data-peer"] for e in page.with_attr("data-peer")}
    assert shown_peers == {p["peer_id"] for p in net["peers"]} >= {p.peer_id for p in swarm.serving()}
    cells = {(e["attrs"]["data-layer"], e["attrs"]["data-providers"]) for e in page.with_attr("data-layer")}
    minilm = net["coverage"]["minilm-l6"]["coverage"]
    assert {(str(c["layer"]), str(len(c["providers"]))) for c in minilm} <= cells
    assert [len(c["providers"]) for c in minilm] == [3, 3, 3, 3, 3]
    titles = {e["attrs"]["data-model-title"] for e in page.with_attr("data-model-title")}
    assert titles == {m["id"] for m in models["data"]}

    rows = page.with_attr("data-verified")
    assert [(r["attrs"]["data-endpoint"], r["attrs"]["data-verified"]) for r in rows] == \
        [(q["endpoint"], json.dumps(q["verified"])) for q in net["recent"]]
    assert [r["attrs"]["data-verified"] for r in rows] == ["null", "false", "true"]  # newest first: the failed chat
    texts = [e["text"] for e in page.found if e["tag"] == "td"]
    assert "VERIFIED" in texts and "UNVERIFIED" in texts
    assert any(net["recent"][0]["error"] == t for t in texts) and net["recent"][0]["error"].startswith("no_route")
