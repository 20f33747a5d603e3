"""Proof chains that cannot be cut (issue 9): a chain must run from the client's first
remote layer to the model's last, and a saved chain carries the output it proves.

The coverage rule is checked on plain ranges first (no ezkl), then end to end on real
proofs through ``p2p-infer verify --proofs``."""

from pathlib import Path

import msgpack
import pytest
import structlog

from p2p_infer.cli import main as cli_main
from p2p_infer.config import default_cache_dir
from p2p_infer.errors import ZkError
from p2p_infer.ml.models import DigitsMLP, load_model
from p2p_infer.verify import zk
from p2p_infer.verify.chain import ProofChainFile, check_coverage, verify_chain

from .test_zk import RANGES, prove_chain

N_LAYERS = 4  # digits-mlp: the client runs layer 0, peers 1-3


def main(argv: list[str]) -> int:
    """The CLI in-process; it points structlog at pytest's captured stderr, so put that back after."""
    try:
        return cli_main(argv)
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize("ranges, reason", [
    ([(1, 2)], "chain ends at layer 2, but the model's last layer is 3"),  # the last shard dropped
    ([(1, 1), (3, 3)], "gap in the chain: layers 1-1, then 3-3 (layers 2-2 not proven)"),
    ([(2, 2), (3, 3)], "chain starts at layer 2, not at the client's first remote layer 1"),
    ([(1, 2), (2, 3)], "proofs do not cover contiguous layers"),
    ([], "no proofs"),
])
def test_a_chain_that_does_not_cover_the_remote_layers_is_refused(ranges, reason):
    with pytest.raises(ZkError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_coverage(ranges, 1, N_LAYERS)


def test_a_covering_chain_passes_the_coverage_rule():
    check_coverage([(1, 2), (3, 3)], 1, N_LAYERS)
    check_coverage([(2, 3)], 2, N_LAYERS)  # a client that ran layers 0-1 itself


def test_the_live_verifier_refuses_a_cut_chain_before_verifying_any_proof(tmp_path):
    fake = zk.ShardProof(1, 2, b"not a proof", ("00" * 32, "11" * 32))
    with pytest.raises(ZkError, match="chain was cut"):  # never reaches ezkl: no kit needed
        verify_chain([fake], {}, "00" * 32, "11" * 32, tmp_path, first_layer=1, n_layers=N_LAYERS)


# ---- end to end: real proofs, the saved file, the CLI ----


@pytest.fixture(scope="module")
def model():
    return load_model("digits-mlp")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> ProofChainFile:
    circuits = zk.circuits_for(model, RANGES, default_cache_dir())
    x = DigitsMLP.dataset()[2][5].tolist()
    h0, out, proofs = prove_chain(model, circuits, x, tmp_path_factory.mktemp("saved"))
    import torch

    from p2p_infer.ml.models import Activation

    result = model.finish(Activation(torch.tensor([out], dtype=torch.float32)))
    return ProofChainFile(model.model_id, 1, 3, zk.hash_values(h0), tuple(out), tuple(proofs), result)


def verify_file(tmp_path: Path, saved: ProofChainFile, capsys) -> tuple[int, str]:
    path = tmp_path / "chain.bin"
    path.write_bytes(saved.encode())
    code = main(["verify", "--proofs", str(path)])
    return code, capsys.readouterr().out


def test_an_honest_saved_chain_verifies_and_says_what_it_covers(saved, tmp_path, capsys):
    code, out = verify_file(tmp_path, saved, capsys)
    assert code == 0, out
    assert "VALID proof chain for digits-mlp: layers 1-2, layers 3-3" in out
    assert "layers 1-3 of 0-3 proven" in out and "claimed result class" in out


def test_a_cut_chain_with_its_output_adjusted_is_invalid(saved, model, tmp_path, capsys):
    """The attack of issue 9: drop the last shard and claim the first shard's output."""
    x = DigitsMLP.dataset()[2][5].tolist()
    circuits = zk.circuits_for(model, RANGES, default_cache_dir())
    _, _, proofs = prove_chain(model, circuits, x, tmp_path)
    middle = zk.circuit_forward(circuits[(1, 2)], model.run_layers(model.embed(x), 0, 0).flatten().tolist(), tmp_path)
    assert zk.hash_values(middle) == proofs[0].instances[1]  # a perfectly linked one-shard chain...
    for last_layer in (3, 2):  # ...whether or not the file also lies about where the model ends
        cut = ProofChainFile(saved.model_id, 1, last_layer, saved.input_hash, tuple(middle), (proofs[0],), None)
        code, out = verify_file(tmp_path, cut, capsys)
        assert code == 1 and out.startswith("INVALID: "), out
        assert ("chain was cut" in out) if last_layer == 3 else ("the manifest says the last layer is 3" in out)


def test_a_chain_with_a_gap_is_invalid(saved, tmp_path, capsys):
    skipped = zk.ShardProof(3, 3, saved.proofs[1].proof, saved.proofs[1].instances)
    gap = ProofChainFile(saved.model_id, 1, 3, saved.input_hash, saved.output,
                         (zk.ShardProof(1, 1, saved.proofs[0].proof, saved.proofs[0].instances), skipped), saved.result)
    code, out = verify_file(tmp_path, gap, capsys)
    assert code == 1 and "INVALID: gap in the chain: layers 1-1, then 3-3" in out


def test_a_wrong_claimed_output_is_invalid(saved, tmp_path, capsys):
    other = (saved.output[0] + 0.25, *saved.output[1:])
    code, out = verify_file(tmp_path, ProofChainFile(**{**saved.__dict__, "output": other}), capsys)
    assert code == 1 and "INVALID: the output received is not the output the last proof is about" in out


def test_a_wrong_claimed_result_is_invalid(saved, tmp_path, capsys):
    wrong = {**saved.result, "class": (saved.result["class"] + 1) % 10}
    code, out = verify_file(tmp_path, ProofChainFile(**{**saved.__dict__, "result": wrong}), capsys)
    assert code == 1 and f"INVALID: the file claims class {wrong['class']}" in out


def test_a_version_1_file_is_refused_with_a_reason(saved, tmp_path, capsys):
    old = {"version": 1, "model_id": saved.model_id, "input_hash": saved.input_hash, "output_hash": "00" * 32,
           "chain": [p.to_wire() for p in saved.proofs]}
    path = tmp_path / "v1.bin"
    path.write_bytes(msgpack.packb(old, use_bin_type=True))
    assert main(["verify", "--proofs", str(path)]) == 1
    assert "version 1 files record neither the layers covered nor the output" in capsys.readouterr().out
