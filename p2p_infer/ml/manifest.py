"""Model manifests: content hashes per shard unit plus the runtime spec; id = hash of it all.

A layer's hash is sha256 over its tensors in name order, each as
``name NUL dtype NUL shape NUL raw-little-endian-bytes``: it depends on the numbers, not on
the file format they were stored in. The manifest is encoded as a msgpack array in a
fixed order (``protocols/manifest.md``) and the model id is the sha256 of those bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from ..errors import ManifestMismatch

if TYPE_CHECKING:
    import torch

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    name: str
    num_layers: int
    hidden_size: int
    dtype: str
    runtime: dict[str, str]  # library versions the hashes and outputs were produced with
    embed_hash: str  # client-side input stage (embeddings / first projection)
    layer_hashes: tuple[str, ...]
    tail_hash: str  # client-side output stage (pooling / head)
    format: int = MANIFEST_FORMAT

    def encode(self) -> bytes:
        return msgpack.packb(
            [
                self.format,
                self.name,
                self.num_layers,
                self.hidden_size,
                self.dtype,
                sorted(self.runtime.items()),
                self.embed_hash,
                list(self.layer_hashes),
                self.tail_hash,
            ],
            use_bin_type=True,
        )

    @property
    def model_id(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def to_json(self) -> str:
        data = asdict(self)
        data["layer_hashes"] = list(self.layer_hashes)
        data["model_id"] = self.model_id
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        claimed = data.pop("model_id", None)
        data["layer_hashes"] = tuple(data["layer_hashes"])
        manifest = cls(**data)
        if claimed is not None and claimed != manifest.model_id:
            raise ManifestMismatch(f"manifest {manifest.name} claims id {claimed}, hashes to {manifest.model_id}")
        return manifest

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.from_json(path.read_text())


def tensor_entry(name: str, tensor: torch.Tensor) -> bytes:
    t = tensor.detach().contiguous().cpu()
    header = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{','.join(map(str, t.shape))}\0".encode()
    return header + t.numpy().tobytes()


def module_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's parameters and buffers, by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(tensor_entry(name, tensor))
    return digest.hexdigest()


def check_layers(manifest: Manifest, layers: list[torch.nn.Module], indices: range) -> None:
    """Refuse weights that differ from what the manifest pins."""
    for i in indices:
        actual = module_hash(layers[i])
        if actual != manifest.layer_hashes[i]:
            raise ManifestMismatch(
                f"{manifest.name} layer {i}: weights hash to {actual[:16]}..., manifest pins {manifest.layer_hashes[i][:16]}..."
            )
