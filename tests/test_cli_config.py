"""``p2p-infer config init|show`` through the CLI process, and the torch-free tables the
argument checks use (held against the real models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from p2p_infer.config import Settings, load_settings

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2p_infer.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**ENV, **(env or {})})


def test_config_init_writes_the_defaults_and_refuses_to_overwrite(tmp_path: Path) -> None:
    made = cli("config", "init", "peer.toml", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "peer.toml").read_text()
    assert "# layers this peer serves" in text and "# max-connections = 256" in text
    assert load_settings(tmp_path / "peer.toml", {}) == Settings()  # it parses, and says the defaults
    again = cli("config", "init", "peer.toml", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.startswith("error: peer.toml exists; pass --force")
    assert cli("config", "init", "peer.toml", "--force", cwd=tmp_path).returncode == 0


def test_config_show_names_each_layer(tmp_path: Path) -> None:
    (tmp_path / "peer.toml").write_text('record-ttl = 60\nmax-concurrent = 3\nserve = ["minilm-l6:1-2"]\n')
    shown = cli("config", "show", "--json", "--config", "peer.toml", "--listen", "/ip4/127.0.0.1/tcp/4001", cwd=tmp_path,
                env={"P2P_INFER_MAX_CONCURRENT": "5"})
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows["record_ttl"] == {"value": 60.0, "source": "file peer.toml"}
    assert rows["max_concurrent"] == {"value": 5, "source": "env P2P_INFER_MAX_CONCURRENT"}
    assert rows["listen"] == {"value": "/ip4/127.0.0.1/tcp/4001", "source": "flag --listen"}
    assert rows["serve"]["value"] == ["minilm-l6:1-2"] and rows["torch_threads"]["source"] == "default"
    table = cli("config", "show", "--config", "peer.toml", cwd=tmp_path)
    assert table.returncode == 0 and "file peer.toml" in table.stdout


def test_config_show_refuses_what_a_command_would(tmp_path: Path) -> None:
    (tmp_path / "peer.toml").write_text("max-conections = 3\n")
    shown = cli("config", "show", "--config", "peer.toml", cwd=tmp_path)
    assert shown.returncode == 2 and "did you mean 'max-connections'" in shown.stderr and "Traceback" not in shown.stderr
    env = cli("config", "show", cwd=tmp_path, env={"P2P_INFER_THRESHOLD_MEMBER": "maybe"})
    assert env.returncode == 2 and "P2P_INFER_THRESHOLD_MEMBER" in env.stderr


def test_the_torch_free_tables_match_the_models() -> None:
    from p2p_infer.cli import params
    from p2p_infer.ml.models import DigitsMLP, MODEL_NAMES, pinned_manifest, PINNED

    assert set(params.model_layers()) == set(MODEL_NAMES)
    assert params.model_layers()["digits-mlp"] == DigitsMLP.num_layers
    assert all(params.model_layers()[name] == pinned_manifest(name).num_layers for name in PINNED)
    assert params.DIGITS_TEST_SIZE == len(DigitsMLP.dataset()[2])
    assert params.digits_test_images()[7] == DigitsMLP.dataset()[2][7].tolist()


def test_a_proof_follows_result_prints_before_its_proofs(capsys) -> None:
    """``query --mode critical --proof-follows`` printed the result before the proofs were in
    and crashed on the missing ``shards`` (KeyError)."""
    from p2p_infer.cli.query import print_proofs

    print_proofs({"verified": False, "first_layer": 1, "last_layer": 3})
    assert "not verified yet (proofs follow)" in capsys.readouterr().out
    print_proofs({"shards": [{"first": 1, "last": 3, "proof_bytes": 9, "vk_sha256": "ab" * 32}], "verify_ms": 2.0})
    assert "VERIFIED in 2.0 ms" in capsys.readouterr().out
