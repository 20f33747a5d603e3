"""SmolLM2-135M split for generation, in one process: conversion, manifest, spans with KV
caches against the unsplit transformers model, and deterministic sampling."""

import json

import numpy as np
import pytest

from p2p_infer.errors import ManifestMismatch, UsageError
from p2p_infer.proto.sampling import Sampling, choose, filtered_log_probs, gumbel_noise

PROMPT = "What is the capital of France?"
SPANS = [(0, 0), (1, 10), (11, 20), (21, 29)]  # the client's layer 0, then three peers


@pytest.fixture(scope="module")
def smol():
    from p2p_infer.ml.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def hf_model(smol):
    """The unsplit transformers model on the same converted weights (the monolithic reference)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(smol.config).eval()
    state = {f"model.layers.{i}.{k}": v for i, e in enumerate(smol.index["layers"]) for k, v in load_file(smol.directory / e["file"]).items()}
    state["model.embed_tokens.weight"] = load_file(smol.directory / smol.index["embed"]["file"])["weight"]
    state["model.norm.weight"] = load_file(smol.directory / smol.index["tail"]["file"])["norm.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    return model


# ---- sampling (sans-IO, no model) ----

def test_greedy_is_argmax_first_maximum():
    assert choose(np.array([0.5, 2.0, 2.0, -1.0], dtype=np.float32), Sampling(), 0) == 1


def test_seeded_sampling_is_reproducible_and_keyed_by_seed_and_index():
    logits = np.linspace(-2, 2, 1000)
    s = Sampling(temperature=1.0, seed=7)
    draws = [choose(logits, s, i) for i in range(50)]
    assert draws == [choose(logits, s, i) for i in range(50)]
    assert draws != [choose(logits, Sampling(temperature=1.0, seed=8), i) for i in range(50)]
    assert len(set(draws)) > 10  # the index changes the noise
    assert not np.array_equal(gumbel_noise(7, 0, 10), gumbel_noise(7, 1, 10))


def test_gumbel_max_draws_with_the_softmax_probabilities():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    draws = np.array([choose(logits, Sampling(temperature=1.0, seed=3), i) for i in range(4000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03), freq


def test_top_k_and_top_p_cut_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isinf(filtered_log_probs(logits, Sampling(temperature=1.0, top_k=2))[2:]).all()
    kept = np.isfinite(filtered_log_probs(logits, Sampling(temperature=1.0, top_p=0.8)))
    assert kept.tolist() == [True, True, False, False]
    draws = {choose(logits, Sampling(temperature=1.0, top_p=0.8, seed=1), i) for i in range(300)}
    assert draws == {0, 1}


@pytest.mark.parametrize("bad", [Sampling(temperature=-1), Sampling(top_k=-1), Sampling(top_p=0.0), Sampling(top_p=1.5), Sampling(seed=-1)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(UsageError):
        bad.validate()


# ---- the model ----

@pytest.mark.slow
def test_conversion_is_content_hashed_and_pinned(smol):
    from p2p_infer.ml.manifest import Manifest
    from p2p_infer.ml.models import pinned_manifest

    index = json.loads((smol.directory / "index.json").read_text())
    assert len(index["layers"]) == 30
    for entry in index["layers"]:
        assert entry["hash"][:16] in entry["file"] and (smol.directory / entry["file"]).is_file()
    assert pinned_manifest("smollm2-135m") == smol.manifest
    assert Manifest.from_json(smol.manifest.to_json()).model_id == smol.manifest.model_id


@pytest.mark.slow
def test_a_tampered_layer_file_is_refused(smol, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from p2p_infer.ml.smollm2 import SmolLM2

    copy = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(smol.directory, copy)
    entry = smol.index["layers"][5]
    tensors = load_file(copy / entry["file"])
    tensors["mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(tensors, copy / entry["file"])
    other = SmolLM2(tmp_path)
    other.layers[4]  # untouched layers load
    with pytest.raises(ManifestMismatch, match="layer 5"):
        other.layers[5]


@pytest.mark.slow
def test_a_span_loads_only_its_layers(tmp_path):
    from p2p_infer.ml.smollm2 import SmolLM2

    model = SmolLM2()
    model.verify_weights(range(11, 21))
    assert model.layers.loaded == list(range(11, 21))


@pytest.mark.slow
def test_split_greedy_32_tokens_equal_hf_generate(smol, hf_model):
    import torch

    from p2p_infer.ml.smollm2 import generate_local

    ids = smol.prompt_ids(PROMPT)
    split = generate_local(smol, ids, 32, Sampling(), spans=SPANS)
    with torch.inference_mode():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
    ref_tokens = ref[0, len(ids):].tolist()
    assert split == ref_tokens[:len(split)] and (len(split) == 32 or split[-1] in smol.eos_ids())
    text = smol.tokenizer.decode(split, skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
def test_split_prefill_matches_hf_hidden_states(smol, hf_model):
    import torch

    from p2p_infer.ml.smollm2 import KVCache

    ids = smol.prompt_ids(PROMPT)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0, -1]
        h = smol.embed_ids(ids)
        for first, last in SPANS:
            h = smol.run_span(h, first, last, KVCache())
        assert torch.allclose(smol.logits(h), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_seeded_sampling_split_equals_unsplit(smol):
    from p2p_infer.ml.smollm2 import generate_local

    ids = smol.prompt_ids("Write a short poem about the sea.")
    s = Sampling(temperature=0.8, top_p=0.95, top_k=50, seed=1234)
    whole = generate_local(smol, ids, 24, s)
    assert generate_local(smol, ids, 24, s, spans=SPANS) == whole
    assert generate_local(smol, ids, 24, s) == whole
    assert generate_local(smol, ids, 24, Sampling(temperature=0.8, top_p=0.95, top_k=50, seed=1235)) != whole


@pytest.mark.slow
def test_one_prefill_reexecution_agrees_with_incremental_decode_within_tolerance(smol):
    """The basis of verification's tolerance (docs/generation.md): a span decoded token by token
    with a KV cache and the same span re-run in one prefill differ by float rounding only."""
    import torch

    from p2p_infer.ml.smollm2 import KVCache
    from p2p_infer.proto.generation import TOLERANCE, agree

    ids = smol.prompt_ids(PROMPT)
    inputs, outputs, caches = {s: [] for s in SPANS}, {s: [] for s in SPANS}, {s: KVCache() for s in SPANS}
    step = ids
    with torch.inference_mode():
        for _ in range(16):
            h = smol.embed_ids(step)
            for span in SPANS:
                inputs[span].append(h)
                h = smol.run_span(h, *span, caches[span])
                outputs[span].append(h)
            step = [int(smol.logits(h).argmax())]
        worst = 0.0
        for span in SPANS[1:]:
            x, used = torch.cat(inputs[span], 1)[0], torch.cat(outputs[span], 1)[0]
            again = smol.run_span(x[None], *span, None)[0]
            assert agree(again.numpy(), used.numpy()), span
            rel = ((again - used).abs() / (TOLERANCE["atol"] + TOLERANCE["rtol"] * used.abs())).max().item()
            worst = max(worst, rel)
            print(f"span {span}: max |diff| {(again - used).abs().max().item():.2e}, max |value| {used.abs().max().item():.1f}, "
                  f"worst fraction of the tolerance {rel:.3f}")
        assert worst < 0.5  # headroom: honest rounding uses under half the tolerance
        lied = outputs[SPANS[2]][5] + 0.01  # a small lie on one token's rows
        assert not agree(lied[0].numpy(), smol.run_span(torch.cat(inputs[SPANS[2]][:6], 1), *SPANS[2], None)[0, -1:].numpy())
