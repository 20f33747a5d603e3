"""A peer's shards: the layer ranges it serves, loaded and verified, and the checks on
each request before any computation (model, range, shapes). Synchronous and torch-only;
the peer runs :meth:`ShardServer.compute` in a worker thread."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import NotServed, P2PInferError, UnknownModel
from .catalog import ServeSpec
from .models import Activation, SplitModel, load_model
from ..proto.records import ShardSpec
from ..proto.tensors import DEFAULT_MAX_BATCH


def layer_bytes(name: str, cache_dir: Path | None = None) -> list[int]:
    """Bytes of each layer's weights, what serving it costs in memory (``--memory-budget``).
    SmolLM2 reads its per-layer files' sizes without loading them; the small models load once."""
    if name == "smollm2-135m":
        from .smollm2 import ensure_converted

        directory = ensure_converted(cache_dir)
        index = json.loads((directory / "index.json").read_text())
        return [int((directory / entry["file"]).stat().st_size) for entry in index["layers"]]
    model = load_model(name, cache_dir)
    return [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.layers]


INLINE_COMPUTE_MS = 1.0


class ShardServer:
    """Loads the served models, verifies the served layers' weights, runs requests."""

    def __init__(self, specs: list[ServeSpec], cache_dir: Path | None = None, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.models: dict[str, SplitModel] = {}
        self.shards: list[ShardSpec] = []
        self.max_batch = max_batch  # inputs per request; the tensor byte limit bounds them too
        self._last_ms: dict[tuple[str, int, int], float] = {}  # each served range's last compute time
        for spec in specs:
            if spec.first is None or spec.last is None:
                raise P2PInferError(f"--serve {spec.model}: layers not chosen yet (the peer picks them after joining)")
            model = load_model(spec.model, cache_dir)
            if spec.last >= len(model.layers):
                raise P2PInferError(f"{spec.model} has layers 0-{len(model.layers) - 1}; cannot serve {spec.first}-{spec.last}")
            model.verify_weights(range(spec.first, spec.last + 1))
            self.models[model.model_id] = model
            self.shards.append(ShardSpec(model.model_id, spec.first, spec.last))

    def serving(self, model_id: str, first: int, last: int) -> SplitModel:
        """The model whose layers ``first..last`` lie inside one shard served here."""
        model = self.models.get(model_id)
        if model is None:
            raise UnknownModel(f"this peer serves no model {model_id[:16]}...")
        if not any(s.model_id == model_id and s.first <= first and last <= s.last for s in self.shards):
            served = ", ".join(f"{s.first}-{s.last}" for s in self.shards if s.model_id == model_id)
            raise NotServed(f"{model.name}: layers {first}-{last} not served here (serving {served})")
        return model

    def check(self, model_id: str, first: int, last: int, act: Activation) -> SplitModel:
        model = self.serving(model_id, first, last)
        model.check_activation(act, self.max_batch)
        return model

    def compute(self, model: SplitModel, first: int, last: int, act: Activation) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = model.run_layers(act, first, last)
        ms = (time.perf_counter() - start) * 1000
        self._last_ms[(model.model_id, first, last)] = ms
        return out, ms

    def quick(self, model: SplitModel, first: int, last: int) -> bool:
        """These layers last ran in under INLINE_COMPUTE_MS: cheaper on the event loop than
        through a worker thread (the hop measured 2-6 ms on a busy 2-core box)."""
        return self._last_ms.get((model.model_id, first, last), INLINE_COMPUTE_MS) < INLINE_COMPUTE_MS

    def measure_throughput(self, repeats: int = 5) -> float:
        """Layer forwards per second on a representative input (MiniLM: 32 tokens)."""
        rates = []
        for shard in self.shards:
            model = self.models[shard.model_id]
            act = model.sample_activation()
            model.run_layers(act, shard.first, shard.first)  # warm up
            start = time.perf_counter()
            for _ in range(repeats):
                model.run_layers(act, shard.first, shard.first)
            rates.append(repeats / max(time.perf_counter() - start, 1e-9))
        return min(rates) if rates else 0.0
