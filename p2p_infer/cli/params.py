"""Argument types and checks that run before torch is imported or the network joined.

Each check is one function raising :class:`ConfigError` or :class:`UsageError`, used both by a
click type (a flag: exit 2 with click's usage line) and by :func:`check_settings` (the same
setting from a config file or the environment)."""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, P2PInferError, UsageError

QUERY_MODELS = ("minilm-l6", "digits-mlp")
# digits-mlp is trained at first use (no pinned manifest): its layer count is the class's
DIGITS_LAYERS = 4  # p2p_infer.ml.models.DigitsMLP.num_layers (tests/test_cli_params.py checks it)
DIGITS_PIXELS = 64
DIGITS_TEST_SIZE = math.ceil(1797 * 0.25)  # sklearn's digits, the 75/25 split of DigitsMLP.dataset()


@cache
def model_layers() -> dict[str, int]:
    """Layers per known model, from the pinned manifests shipped in the package (no torch)."""
    found = {"digits-mlp": DIGITS_LAYERS}
    for entry in resources.files("p2p_infer.ml.manifests").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            found[data["name"]] = int(data["num_layers"])
    return found


def parse_serve(text: str) -> tuple[str, int | None, int | None]:
    """``MODEL:FIRST-LAST`` checked against the model's layer count; ``MODEL`` alone: the peer
    picks the layers the network covers least (proto/coverage.py), FIRST and LAST None."""
    if ":" not in text:
        if text not in model_layers():
            raise ConfigError(f"unknown model {text!r} in --serve; known: {', '.join(sorted(model_layers()))}")
        return text, None, None
    model, sep, layers = text.rpartition(":")
    first_s, _, last_s = layers.partition("-")
    if not sep or not first_s.isdigit() or not (last_s or first_s).isdigit():
        raise ConfigError(f"--serve takes MODEL:FIRST-LAST (e.g. minilm-l6:2-3), got {text!r}")
    first, last = int(first_s), int(last_s or first_s)
    known = model_layers()
    if model not in known:
        raise ConfigError(f"unknown model {model!r} in --serve {text!r}; known: {', '.join(sorted(known))}")
    n = known[model]
    if not 0 <= first <= last < n:
        raise ConfigError(f"--serve {text}: {model} has layers 0-{n - 1}, so FIRST-LAST must lie within 0-{n - 1} with FIRST <= LAST")
    return model, first, last


def parse_multiaddr(text: str, what: str, need_peer: bool) -> str:
    import multiaddr

    example = "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooW..." if need_peer else "/ip4/127.0.0.1/tcp/4001"
    try:
        addr = multiaddr.Multiaddr(text)
        addr.value_for_protocol("tcp")
    except Exception:  # noqa: BLE001 - the library raises several types for a malformed address
        raise ConfigError(f"{what} {text!r} is not a TCP multiaddr (e.g. {example})") from None
    if need_peer and "p2p" not in [p.name for p in addr.protocols()]:
        raise ConfigError(f"{what} {text!r} has no /p2p/PEER_ID part (e.g. {example})")
    return text


def parse_query_input(model: str, text: str) -> Any:
    """The query's input for ``model``: text, 64 pixel values or ``test:N`` (UsageError otherwise)."""
    if model != "digits-mlp":
        if not text.strip():
            raise UsageError("the input text is empty: give the sentence to embed")
        return text
    if text.startswith("test:"):
        index = text[5:]
        if not index.isdigit() or int(index) >= DIGITS_TEST_SIZE:
            raise UsageError(f"test:N picks a digits test image, N in 0-{DIGITS_TEST_SIZE - 1}; got {text!r}")
        return digits_test_images()[int(index)]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"digits-mlp takes {DIGITS_PIXELS} comma-separated numbers or test:N, got {text[:40]!r}") from None
    if len(values) != DIGITS_PIXELS or not all(math.isfinite(v) for v in values):
        raise UsageError(f"digits-mlp takes {DIGITS_PIXELS} finite comma-separated values (an 8x8 image), got {len(values)}")
    return values


def digits_test_images() -> list[list[float]]:
    """The digits test split, cached as JSON beside the model: sklearn costs seconds per cold query."""
    from ..config import default_cache_dir

    path = default_cache_dir() / "models" / "digits-mlp-test-images.json"
    try:
        images = json.loads(path.read_text())
        if isinstance(images, list) and len(images) == DIGITS_TEST_SIZE:
            return images
    except (OSError, ValueError):
        pass
    from ..files import write_atomically
    from ..ml.models import DigitsMLP

    images = DigitsMLP.dataset()[2].tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(images).encode())
    return images


class _Checked(click.ParamType):
    """A click type around one of the checks above."""

    def __init__(self, name: str, check: Any) -> None:
        self.name = name
        self._check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return self._check(value)
        except P2PInferError as exc:
            self.fail(exc.message, param, ctx)


SERVE = _Checked("MODEL[:FIRST-LAST]", lambda v: (parse_serve(v), v)[1])
MEMORY_SIZE = _Checked("SIZE", lambda v: (parse_memory_budget(v), v)[1])


def parse_memory_budget(text: str) -> int:
    from ..proto.coverage import parse_size  # sans-IO, no torch

    return parse_size(text)
LISTEN_ADDR = _Checked("MULTIADDR", lambda v: parse_multiaddr(v, "--listen", need_peer=False))
PEER_ADDR = _Checked("MULTIADDR", lambda v: parse_multiaddr(v, "--bootstrap", need_peer=True))
PROBABILITY = click.FloatRange(0.0, 1.0, min_open=True)


def check_settings(settings: Any) -> None:
    """The checks flags get, for the merged settings (a config file or env var may carry them)."""
    for spec in settings.serve:
        parse_serve(spec)
    if settings.memory_budget:
        parse_memory_budget(settings.memory_budget)
    if settings.max_batch < 1:
        raise ConfigError(f"max-batch must be at least 1, got {settings.max_batch}")
    parse_multiaddr(settings.listen, "listen", need_peer=False)
    for addr in settings.bootstrap:
        parse_multiaddr(addr, "bootstrap", need_peer=True)
    if settings.bootstrap_file is not None:
        for addr in read_bootstrap_file(settings.bootstrap_file):
            parse_multiaddr(addr, f"{settings.bootstrap_file}:", need_peer=True)
    settings.limits()  # every limit positive


def read_bootstrap_file(path: Path) -> list[str]:
    try:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    except OSError as exc:
        raise ConfigError(f"cannot read bootstrap file {path}: {exc.strerror}") from None
    return [line for line in lines if line]
