import torch

from p2p_infer.errors import ManifestMismatch
from p2p_infer.ml.manifest import Manifest, module_hash
from p2p_infer.ml.models import Activation, DigitsMLP, known_manifests, load_model

import pytest


def test_digits_classifier_is_accurate_and_deterministic():
    model = load_model("digits-mlp")
    assert model.accuracy >= 0.95
    _, _, x_test, y_test = DigitsMLP.dataset()
    preds = [model.run_local(x.tolist())["class"] for x in x_test[:100]]
    assert sum(p == int(y) for p, y in zip(preds, y_test[:100])) >= 90


def test_minilm_layerwise_equals_full_model():
    model = load_model("minilm-l6")
    text = "layer by layer equals all at once"
    act = model.embed(text)
    enc = model.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        ref = model.bert(**enc).last_hidden_state
    assert torch.equal(model.run_layers(act, 0, 5), ref)
    emb = model.run_local(text)["embedding"]
    assert abs(sum(v * v for v in emb) - 1.0) < 1e-5


def test_manifest_ids_are_content_addresses():
    manifests = known_manifests()
    names = {m.name for m in manifests.values()}
    assert names == {"minilm-l6", "digits-mlp", "smollm2-135m"}
    for model_id, manifest in manifests.items():
        assert Manifest.from_json(manifest.to_json()).model_id == model_id


def test_tampered_weights_are_refused():
    model = load_model("digits-mlp")
    weight = model.layers[2][0].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1e-3
    try:
        with pytest.raises(ManifestMismatch, match="layer 2"):
            model.verify_weights(range(2, 3))
        model.verify_weights(range(0, 2))  # untouched layers still verify
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    model.verify_weights()


def test_manifest_json_with_wrong_id_is_refused():
    text = load_model("digits-mlp").manifest.to_json().replace('"model_id": "', '"model_id": "00')
    with pytest.raises(ManifestMismatch):
        Manifest.from_json(text)


def test_minilm_rejects_malformed_activations():
    from p2p_infer.errors import BadTensor

    model = load_model("minilm-l6")
    with pytest.raises(BadTensor, match="attention mask"):
        model.check_activation(Activation(torch.zeros(1, 4, 384), None))
    with pytest.raises(BadTensor, match="0 or 1"):
        model.check_activation(Activation(torch.zeros(1, 4, 384), torch.full((1, 4), 7, dtype=torch.int64)))
    with pytest.raises(BadTensor, match="float32"):
        model.check_activation(Activation(torch.zeros(1, 4, 383), torch.ones(1, 4, dtype=torch.int64)))
