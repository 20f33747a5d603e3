"""ZK proofs of shard execution (ezkl): real circuits, real proofs, and every tampering
case the issue names. Circuits are built once into the test cache (about 2 s each)."""

import json
import shutil
from pathlib import Path

import msgpack
import pytest
import torch

from p2p_infer.verify import zk
from p2p_infer.config import default_cache_dir
from p2p_infer.testing.harness import Swarm
from p2p_infer.ml.models import DigitsMLP, load_model

RANGES = [(1, 2), (3, 3)]

BUILD_AT_START = {"P2P_INFER_BUILD_CIRCUITS": "1"}  # critical mode needs circuits built at start-up


@pytest.fixture(scope="module")
def model():
    return load_model("digits-mlp")


@pytest.fixture(scope="module")
def circuits(model):
    return zk.circuits_for(model, RANGES, default_cache_dir())


def prove_chain(model, circuits, x, tmp: Path, tamper_between=None):
    act = model.embed(x)
    h0 = model.run_layers(act, 0, 0).flatten().tolist()
    r1 = zk.run_and_prove(str(circuits[(1, 2)].directory), circuits[(1, 2)].logrows, str(circuits[(1, 2)].srs), h0, str(tmp / "a"))
    middle = r1["outputs"] if tamper_between is None else tamper_between(r1["outputs"])
    r2 = zk.run_and_prove(str(circuits[(3, 3)].directory), circuits[(3, 3)].logrows, str(circuits[(3, 3)].srs), middle, str(tmp / "b"))
    proofs = [zk.ShardProof(1, 2, r1["proof"], tuple(r1["instances"])), zk.ShardProof(3, 3, r2["proof"], tuple(r2["instances"]))]
    return h0, r2["outputs"], proofs


def verify_all(circuits, proofs, tmp):
    for p in proofs:
        c = circuits[(p.first, p.last)]
        zk.verify_proof(p, c.settings, c.vk, c.srs, tmp)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """One swarm for the end-to-end tests: they only query it (none stops or changes a peer)."""
    with Swarm(tmp_path_factory.mktemp("zk-swarm"), extra_env=BUILD_AT_START) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers([["digits-mlp:1-2"], ["digits-mlp:3-3"]])
        swarm.wait_discoverable()
        yield swarm


@pytest.fixture(scope="module")
def chain(model, circuits, tmp_path_factory):
    x = DigitsMLP.dataset()[2][0].tolist()
    return prove_chain(model, circuits, x, tmp_path_factory.mktemp("chain"))


def test_a_proof_chain_verifies_and_matches_the_float_model(model, circuits, chain, tmp_path):
    h0, out, proofs = chain
    verify_all(circuits, proofs, tmp_path)
    zk.check_chain(proofs, zk.hash_values(h0), zk.hash_values(out))
    x = DigitsMLP.dataset()[2][0].tolist()
    float_out = model.run_layers(model.embed(x), 0, 3).flatten()
    assert (torch.tensor(out) - float_out).abs().max() < 16 * 2**-zk.ZK_SCALE * 8  # quantisation bound, docs/zk.md
    assert len(proofs[0].proof) < 10_000  # proofs are small; proving keys never travel
    assert circuits[(1, 2)].pk.stat().st_size > 1_000_000


def test_quantised_chain_predicts_like_the_float_model_on_the_whole_test_split(model, circuits, tmp_path):
    _, _, x_test, _ = DigitsMLP.dataset()
    mismatches, worst = 0, 0.0
    for x in x_test:
        act = model.embed(x.tolist())
        h = model.run_layers(act, 0, 0).flatten().tolist()
        for first, last in RANGES:
            h = zk.circuit_forward(circuits[(first, last)], h, tmp_path)
        out = torch.tensor(h).reshape(1, -1)
        ref = model.run_layers(act, 0, 3)
        worst = max(worst, float((out - ref).abs().max()))
        mismatches += model.finish(type(act)(out))["class"] != model.finish(type(act)(ref))["class"]
    print(f"quantised chain over {len(x_test)} test images: {mismatches} prediction changes, max abs error {worst:.2e}")
    assert mismatches == 0
    assert worst < 0.05  # the documented bound for two shards at scale 13 (docs/zk.md)


def test_altered_output_is_detected(chain):
    h0, out, proofs = chain
    altered = list(out)
    altered[0] += 0.25
    with pytest.raises(zk.ZkError, match="output received is not the output the last proof"):
        zk.check_chain(proofs, zk.hash_values(h0), zk.hash_values(altered))


def test_altered_activation_between_shards_is_detected(model, circuits, tmp_path):
    x = DigitsMLP.dataset()[2][1].tolist()
    h0, out, proofs = prove_chain(model, circuits, x, tmp_path, tamper_between=lambda v: [v[0] + 0.5, *v[1:]])
    verify_all(circuits, proofs, tmp_path)  # each proof is valid on its own...
    with pytest.raises(zk.ZkError, match="output of layers 1-2 is not the input of layers 3-3"):
        zk.check_chain(proofs, zk.hash_values(h0), zk.hash_values(out))  # ...but they do not chain


def test_a_proof_about_another_input_is_detected(chain):
    h0, out, proofs = chain
    with pytest.raises(zk.ZkError, match="not about the activation the client sent"):
        zk.check_chain(proofs, zk.hash_values([v + 0.01 for v in h0]), zk.hash_values(out))


def test_a_proof_for_other_weights_fails(circuits, chain, tmp_path):
    _, _, proofs = chain
    other = circuits[(3, 3)]  # another shard's circuit: different fixed weights in its vk
    with pytest.raises(zk.ZkError, match="does not verify"):
        zk.verify_proof(zk.ShardProof(1, 2, proofs[0].proof, proofs[0].instances), other.settings, other.vk, other.srs, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip-first", "flip-middle", "flip-last", "instance"])
def test_damaged_proofs_fail(circuits, chain, tmp_path, damage):
    _, _, proofs = chain
    p = proofs[0]
    raw = bytearray(p.proof)
    instances = p.instances
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "instance":
        v = (int.from_bytes(bytes.fromhex(instances[1]), "little") + 1) % zk.P_BN254
        instances = (instances[0], v.to_bytes(32, "little").hex())
    else:
        raw[{"flip-first": 0, "flip-middle": len(raw) // 2, "flip-last": -1}[damage]] ^= 0x01
    c = circuits[(1, 2)]
    with pytest.raises(zk.ZkError, match="does not verify"):
        zk.verify_proof(zk.ShardProof(1, 2, bytes(raw), instances), c.settings, c.vk, c.srs, tmp_path)


def test_non_provable_model_is_a_clear_error():
    with pytest.raises(zk.NotProvable, match="minilm-l6 is not provable"):
        zk.circuits_for(load_model("minilm-l6"), [(1, 2)], default_cache_dir())


def test_artifacts_must_match_their_pins(tmp_path, circuits):
    store = zk.ArtifactStore(tmp_path)
    vk = circuits[(1, 2)].vk
    sha = zk.sha256_file(vk)
    assert store.put(sha, vk.read_bytes()).read_bytes() == vk.read_bytes()
    with pytest.raises(zk.ZkError, match="does not match its pinned hash"):
        data = bytearray(vk.read_bytes())
        data[-1] ^= 0x01
        store.put(sha, bytes(data))
    with pytest.raises(zk.ZkError, match="differs from the manifest"):
        zk.checked(circuits[(3, 3)].vk, sha, "verifying key")
    pins = zk.load_zk_manifest(default_cache_dir(), load_model("digits-mlp").model_id)
    assert pins is not None and pins.pin(1, 2).vk_sha256 == sha
    assert zk.ArtifactStore(default_cache_dir()).find(zk.sha256_file(circuits[(1, 2)].pk)) is None  # never served


def test_malformed_proof_on_the_wire():
    with pytest.raises(zk.ZkError, match="proof must be"):
        zk.ShardProof.from_wire({"first": 1, "last": 2, "proof": "nope", "instances": []})


@pytest.mark.slow
def test_critical_queries_over_two_peers(swarm, tmp_path):
    model = load_model("digits-mlp")
    _, _, x_test, _ = DigitsMLP.dataset()
    for i in range(2):  # two proved queries in a row; every test image's chain is checked in-process above
        proofs_file = tmp_path / f"p{i}.bin"
        out = json.loads(swarm.cli("query", "--model", "digits-mlp", "--mode", "critical", "--json",
                                   "--save-proofs", str(proofs_file), f"test:{i}").stdout)
        assert out["mode"] == "critical" and out["proofs"]["verified"] is True
        assert [(s["first"], s["last"]) for s in out["proofs"]["shards"]] == RANGES
        assert out["output"]["class"] == model.run_local(x_test[i].tolist())["class"]
        assert swarm.cli("verify", "--proofs", str(proofs_file)).returncode == 0
    # a saved chain whose claimed output was changed no longer verifies offline
    data = msgpack.unpackb(proofs_file.read_bytes())
    assert data["version"] == 2 and (data["first_layer"], data["last_layer"]) == (1, 3)
    data["output"] = [0.0] * 32
    bad = tmp_path / "bad.bin"
    bad.write_bytes(msgpack.packb(data, use_bin_type=True))
    result = swarm.cli("verify", "--proofs", str(bad), check=False)
    assert result.returncode == 1 and "INVALID: the output received is not the output the last proof" in result.stdout
    # ...nor does one whose last shard was dropped (issue 9: the chain must reach the model's last layer)
    data = msgpack.unpackb(proofs_file.read_bytes())
    data["chain"] = data["chain"][:1]
    bad.write_bytes(msgpack.packb(data, use_bin_type=True))
    result = swarm.cli("verify", "--proofs", str(bad), check=False)
    assert result.returncode == 1 and "chain was cut" in result.stdout
    # a client whose cache holds only the weights and the ZK manifest (the pins) fetches
    # settings, verifying keys and SRS from the peers, checking each against its pin
    fresh = tmp_path / "fresh-cache"
    (fresh / "models").mkdir(parents=True)
    for f in (default_cache_dir() / "models").glob("digits-mlp-*.pt"):
        shutil.copy(f, fresh / "models" / f.name)
    pins = zk.zk_manifest_path(default_cache_dir(), model.model_id)
    zk.zk_manifest_path(fresh, model.model_id).parent.mkdir(parents=True)
    shutil.copy(pins, zk.zk_manifest_path(fresh, model.model_id))
    out = json.loads(swarm.cli("query", "--model", "digits-mlp", "--mode", "critical", "--json", "test:9",
                               env={"P2P_INFER_CACHE": str(fresh)}).stdout)
    assert out["proofs"]["verified"] is True and out["proofs"]["artifacts_fetched"] == 5  # 2 settings, 2 vks, 1 SRS
    assert not list((fresh / "zk").glob("circuits/*/pk.key"))  # a verifier never needs a proving key
    # pins that name a verifying key nobody has: a clear error, no silent fallback
    manifest = json.loads(pins.read_text())
    first_shard = next(p for p in manifest["shards"] if (p["first"], p["last"]) == RANGES[0])
    first_shard["vk_sha256"] = "0" * 64  # the pins may hold other ranges too (other tests' circuits)
    zk.zk_manifest_path(fresh, model.model_id).write_text(json.dumps(manifest))
    failed = swarm.cli("query", "--model", "digits-mlp", "--mode", "critical", "test:9", check=False,
                       env={"P2P_INFER_CACHE": str(fresh)})
    assert failed.returncode != 0 and "no peer supplied the verifying key 0000000000000000" in failed.stderr
    # critical routes use whole shards (a circuit covers one): starting inside one is no route
    query = swarm.cli("query", "--model", "digits-mlp", "--mode", "critical", "--local-layers", "2", "test:0", check=False)
    assert query.returncode != 0 and "no live peer serves layer 2" in query.stderr


@pytest.mark.slow
def test_critical_mode_with_a_committee_is_refused_by_name(swarm, tmp_path):
    """Committee stages would drop every ZK proof unchecked: the CLI refuses the combination
    by name, in one line, before it sends anything (issue 8)."""
    refused = swarm.cli("query", "--model", "digits-mlp", "--committee", "3", "--mode", "critical", "test:0", check=False)
    assert refused.returncode != 0 and refused.stdout == ""
    assert "committee with zk" in refused.stderr and "--committee K with --mode critical" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    forwarding = swarm.cli("query", "--model", "digits-mlp", "--forwarding", "--mode", "critical", "test:0", check=False)
    assert forwarding.returncode != 0 and "forwarding with zk (--forwarding with --mode critical)" in forwarding.stderr
    # the same swarm still answers a supported critical query
    out = json.loads(swarm.cli("query", "--model", "digits-mlp", "--mode", "critical", "--json", "test:0").stdout)
    assert out["mode"] == "critical" and out["proofs"]["verified"] is True


@pytest.mark.slow
async def test_proof_follows_the_result(swarm, tmp_path):
    from p2p_infer.node.client import Client

    model = load_model("digits-mlp")
    x = DigitsMLP.dataset()[2][12].tolist()
    async with Client([swarm.bootstrap.addr], critical=True, proof_follows=True) as c:
        result = await c.classify(x)
        assert result.proofs == {"verified": None, "pending": 2}  # the answer came before the proofs
        assert result.output["class"] == model.run_local(x)["class"]
        report = await c.verify_followed(result)
        assert report["verified"] is True and [s["first"] for s in report["shards"]] == [1, 3]
        with pytest.raises(ValueError):
            await c.verify_followed(result)  # collected once


def test_a_supplied_ceremony_srs_is_used_instead_of_a_generated_one(tmp_path, circuits, monkeypatch):
    ceremony = tmp_path / "ceremony"
    ceremony.mkdir()
    shutil.copy(circuits[(1, 2)].srs, ceremony / "kzg12.srs")
    monkeypatch.setenv("P2P_INFER_SRS_DIR", str(ceremony))
    got = zk.ensure_srs(tmp_path / "cache", 12)
    assert got.read_bytes() == (ceremony / "kzg12.srs").read_bytes()
