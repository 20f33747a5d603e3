"""The ZK manifest pins one SRS per circuit size, so shards of one model that need
different sizes share one cache (they used to clash: one SRS per model)."""

import json
from pathlib import Path

import pytest

from p2p_infer.errors import ZkError
from p2p_infer.verify import zk


def _circuit(root: Path, first: int, last: int, logrows: int, srs_bytes: bytes) -> zk.Circuit:
    directory = root / f"{first}-{last}"
    directory.mkdir(parents=True)
    (directory / "settings.json").write_text(json.dumps({"run_args": {"logrows": logrows}, "shard": [first, last]}))
    (directory / "vk.key").write_bytes(b"vk-%d-%d" % (first, last))
    srs = root / f"kzg{logrows}-{srs_bytes.hex()}.srs"
    srs.write_bytes(srs_bytes)
    return zk.Circuit(directory, first, last, logrows, srs)


def test_shards_of_different_sizes_share_one_manifest(tmp_path):
    small = _circuit(tmp_path / "c", 1, 1, 12, b"srs-12")
    large = _circuit(tmp_path / "c", 1, 2, 15, b"srs-15")
    zk.record_pins(tmp_path, "m" * 64, {(1, 1): small})
    manifest = zk.record_pins(tmp_path, "m" * 64, {(1, 2): large})
    assert manifest.srs_sha256 == {12: zk.sha256_file(small.srs), 15: zk.sha256_file(large.srs)}
    assert manifest.srs_for(manifest.pin(1, 2)) == zk.sha256_file(large.srs)
    assert zk.load_zk_manifest(tmp_path, "m" * 64) == manifest


def test_two_srs_files_of_one_size_are_refused(tmp_path):
    zk.record_pins(tmp_path, "m" * 64, {(1, 1): _circuit(tmp_path / "a", 1, 1, 12, b"one")})
    with pytest.raises(ZkError, match="logrows 12"):
        zk.record_pins(tmp_path, "m" * 64, {(2, 2): _circuit(tmp_path / "b", 2, 2, 12, b"two")})


def test_a_format_1_manifest_still_reads(tmp_path):
    pin = {"first": 1, "last": 1, "settings_sha256": "a" * 64, "vk_sha256": "b" * 64, "logrows": 12}
    old = json.dumps({"model_id": "m" * 64, "srs_sha256": "c" * 64, "shards": [pin]})
    manifest = zk.ZkManifest.from_json(old)
    assert manifest.srs_for(manifest.pin(1, 1)) == "c" * 64
    with pytest.raises(ZkError, match="no SRS of logrows 13"):
        manifest.srs_for(zk.CircuitPin(1, 1, "a" * 64, "b" * 64, 13))
