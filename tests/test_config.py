from pathlib import Path

import pytest

from p2p_infer.cli import build_parser, settings_from
from p2p_infer.config import load_settings


def test_precedence_file_env_flag(tmp_path, monkeypatch):
    cfg = tmp_path / "peer.toml"
    cfg.write_text('listen = "/ip4/127.0.0.1/tcp/4001"\nrecord-ttl = 60\nserve = ["minilm-l6:1-2"]\nbootstrap = ["/a"]\n')
    monkeypatch.setenv("P2P_INFER_RECORD_TTL", "30")
    s = load_settings(cfg, {})
    assert s.listen == "/ip4/127.0.0.1/tcp/4001" and s.record_ttl == 30.0 and s.serve == ["minilm-l6:1-2"]
    s = load_settings(cfg, {"record_ttl": 5.0, "listen": "/ip4/127.0.0.1/tcp/0"})
    assert s.record_ttl == 5.0 and s.listen == "/ip4/127.0.0.1/tcp/0"


def test_unknown_setting_is_an_error(tmp_path):
    cfg = tmp_path / "peer.toml"
    cfg.write_text("lisen = 1\n")
    with pytest.raises(ValueError, match="lisen"):
        load_settings(cfg, {})


def test_cli_flags_reach_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    boot = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    args = build_parser().parse_args(["peer", "--serve", "digits-mlp:1-2", "--bootstrap", boot, "--key", "k", "--record-ttl", "9"])
    s = settings_from(args)
    assert s.serve == ["digits-mlp:1-2"] and s.bootstrap == [boot] and s.key == Path("k") and s.record_ttl == 9.0
