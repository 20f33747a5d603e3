"""``p2p-infer verify --proofs`` with a file whose proofs were made with another SRS (another
cache's test SRS): it says so, CANNOT VERIFY, instead of calling a valid proof INVALID."""

from dataclasses import replace
from pathlib import Path

from p2p_infer.config import default_cache_dir
from p2p_infer.verify import zk
from p2p_infer.verify.chain import ProofChainFile, local_kits

from .test_proof_chain import main, model, saved  # noqa: F401 - the module's fixtures: real proofs, built here


def pins_of(saved: ProofChainFile, model) -> tuple[dict[str, str], ...]:  # noqa: F811
    kits = local_kits(model, [(p.first, p.last) for p in saved.proofs], default_cache_dir())
    return tuple({"vk_sha256": zk.sha256_file(kits[(p.first, p.last)].vk), "srs_sha256": zk.sha256_file(kits[(p.first, p.last)].srs)}
                 for p in saved.proofs)


def run(tmp_path: Path, chain: ProofChainFile, capsys) -> tuple[int, str]:
    path = tmp_path / "chain.bin"
    path.write_bytes(chain.encode())
    assert ProofChainFile.decode(path.read_bytes()).pins == chain.pins  # the pins survive the file
    return main(["verify", "--proofs", str(path)]), capsys.readouterr().out


def test_pinned_keys_that_match_verify(saved, model, tmp_path, capsys):  # noqa: F811
    code, out = run(tmp_path, replace(saved, pins=pins_of(saved, model)), capsys)
    assert code == 0 and out.startswith("VALID proof chain"), out


def test_another_srs_is_named_not_called_invalid(saved, model, tmp_path, capsys):  # noqa: F811
    pins = pins_of(saved, model)
    other = ({**pins[0], "srs_sha256": "ab" * 32},) + pins[1:]
    code, out = run(tmp_path, replace(saved, pins=other), capsys)
    assert code == 1 and "INVALID" not in out, out
    assert out.startswith("CANNOT VERIFY here: the proof of layers 1-2 was made with SRS abababababababab...") and "P2P_INFER_SRS_DIR" in out
