"""What this software serves, named without loading anything: the model names and the
``--serve`` argument. Torch-free, so a peer that serves no layers (a bootstrap peer) starts
without importing torch (~1.5 s per start)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import P2PInferError, UnknownModel

MODEL_NAMES = ("minilm-l6", "digits-mlp", "smollm2-135m")
PINNED = ("minilm-l6", "smollm2-135m")  # manifests shipped in ml/manifests/


@dataclass(frozen=True)
class ServeSpec:
    """``MODEL:FIRST-LAST`` as given on the command line (model by name), or ``MODEL`` alone:
    the peer picks the layers once it has read the network's coverage (``first`` is then None)."""

    model: str
    first: int | None
    last: int | None

    @property
    def auto(self) -> bool:
        return self.first is None

    def chosen(self, first: int, last: int) -> ServeSpec:
        return ServeSpec(self.model, first, last)

    @classmethod
    def parse(cls, text: str) -> ServeSpec:
        if ":" not in text:  # MODEL alone: the layers are chosen after joining (proto/coverage.py)
            if text not in MODEL_NAMES:
                raise UnknownModel(f"unknown model {text!r} in --serve; known: {', '.join(MODEL_NAMES)}")
            return cls(text, None, None)
        try:
            model, layers = text.rsplit(":", 1)
            first_s, _, last_s = layers.partition("-")
            first, last = int(first_s), int(last_s or first_s)
        except ValueError:
            raise P2PInferError(f"--serve takes MODEL:FIRST-LAST (e.g. minilm-l6:2-3), got {text!r}") from None
        if model not in MODEL_NAMES:
            raise UnknownModel(f"unknown model {model!r} in --serve; known: {', '.join(MODEL_NAMES)}")
        if not 0 <= first <= last:
            raise P2PInferError(f"bad layer range {first}-{last} in --serve {text!r}")
        return cls(model, first, last)
