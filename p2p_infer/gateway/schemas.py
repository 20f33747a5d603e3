"""OpenAI-compatible request parsing and response shapes (embeddings, chat completions,
models, errors), as plain functions over JSON values: no I/O, no network.

Every answer carries its verification evidence in the extension field ``p2p_infer``
(docs/gateway.md); a request asks for an unverified answer only explicitly, with
``"p2p_infer": {"unverified": true}`` (the openai client: ``extra_body=``).
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import (CannotVerify, ConsensusError, InvalidApiRequest, NoRoute, Overloaded, P2PInferError, PeerUnreachable,
                      UnknownModel, UsageError, VerificationFailed)

EMBEDDING_MODEL = "minilm-l6"
CHAT_MODEL = "smollm2-135m"
MAX_INPUTS = 64  # texts per embeddings request
MAX_NEW_TOKENS = 512
DEFAULT_MAX_TOKENS = 64
ROLES = ("system", "user", "assistant")
# fields the OpenAI clients may send that change nothing here when left at their defaults
IGNORED = {"user", "metadata", "store", "service_tier", "dimensions", "parallel_tool_calls"}
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "stop": None, "tools": None,
           "tool_choice": None, "response_format": None, "logit_bias": None, "top_logprobs": None}


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    inputs: list[str]
    single: bool  # ``input`` was one string, not a list
    encoding_format: str  # "float" | "base64" (little-endian float32, what the openai client asks for)
    unverified: bool


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # None: the gateway draws one and reports it
    unverified: bool


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidApiRequest("the request body must be a JSON object")
    return body


def _unverified(body: dict[str, Any]) -> bool:
    ext = body.get("p2p_infer", {})
    if not isinstance(ext, dict) or not isinstance(ext.get("unverified", False), bool):
        raise InvalidApiRequest("p2p_infer must be an object; p2p_infer.unverified a boolean", "p2p_infer")
    unknown = sorted(set(ext) - {"unverified"})
    if unknown:
        raise InvalidApiRequest(f"unknown p2p_infer field(s) {unknown}", "p2p_infer")
    return bool(ext.get("unverified", False))


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    """Refuse what cannot be honoured, by name, rather than ignore it."""
    for name, value in body.items():
        if name in known or name in IGNORED or name == "p2p_infer":
            continue
        if name in NEUTRAL and value in (NEUTRAL[name], None):
            continue
        raise InvalidApiRequest(f"{name!r} is not supported by this gateway" +
                                (f" (only {NEUTRAL[name]!r})" if name in NEUTRAL else ""), name)


def _model(body: dict[str, Any], expected: str, what: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidApiRequest("'model' is required", "model")
    if model != expected:
        raise UnknownModel(f"the model {model!r} does not exist here: {what} are served by {expected!r}")
    return model


def parse_embeddings(body: Any) -> EmbeddingsRequest:
    body = _object(body)
    _check_fields(body, {"model", "input", "encoding_format"})
    model = _model(body, EMBEDDING_MODEL, "embeddings")
    raw = body.get("input")
    single = isinstance(raw, str)
    inputs = [raw] if single else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise InvalidApiRequest("'input' must be a string or a non-empty list of strings (token arrays are not supported)", "input")
    if any(not t for t in inputs):
        raise InvalidApiRequest("'input' must not contain empty strings", "input")
    if len(inputs) > MAX_INPUTS:
        raise InvalidApiRequest(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidApiRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    return EmbeddingsRequest(model, inputs, single, fmt, _unverified(body))


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidApiRequest(f"{name!r} must be a number in [{low}, {high}], got {value!r}", name)
    return float(value)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidApiRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidApiRequest(f"messages[{i}] must be an object with a role in {list(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise InvalidApiRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidApiRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] == "assistant":
        raise InvalidApiRequest("the last message must be from the user or the system, not the assistant", "messages")
    return out


def parse_chat(body: Any) -> ChatRequest:
    body = _object(body)
    _check_fields(body, {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                         "temperature", "top_p", "top_k", "seed"})
    model = _model(body, CHAT_MODEL, "chat completions")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidApiRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or (options and not stream):
        raise InvalidApiRequest("stream_options is an object, and only with stream: true", "stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = int(_number(body, name, DEFAULT_MAX_TOKENS, 1, MAX_NEW_TOKENS))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidApiRequest("'seed' must be a non-negative integer", "seed")
    return ChatRequest(model, _messages(body), stream, bool(options.get("include_usage", False)), max_tokens,
                       _number(body, "temperature", 1.0, 0.0, 2.0), _number(body, "top_p", 1.0, 0.0, 1.0),
                       int(_number(body, "top_k", 0, 0, 1000)), seed, _unverified(body))


# ---- answers ----


def encode_embedding(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embeddings_response(req: EmbeddingsRequest, vectors: list[list[float]], prompt_tokens: int, evidence: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, req.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": req.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "p2p_infer": evidence,
    }


def completion(cid: str, created: int, model: str, text: str, finish: str, usage: dict[str, int],
               evidence: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage,
        "p2p_infer": evidence,
    }


def chunk(cid: str, created: int, model: str, fingerprint: str, delta: dict[str, Any] | None, finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices, **extra}


def usage(prompt: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


# ---- errors ----


def error_status(exc: P2PInferError) -> tuple[int, str]:
    """HTTP status and OpenAI error ``type`` for one of our errors."""
    if isinstance(exc, UnknownModel):
        return 404, "invalid_request_error"
    if isinstance(exc, UsageError):
        return 400, "invalid_request_error"
    if isinstance(exc, Overloaded):
        return 429, "rate_limit_error"
    if isinstance(exc, (CannotVerify, NoRoute, PeerUnreachable)) or exc.retryable is True:
        return 503, "service_unavailable"
    if isinstance(exc, (ConsensusError, VerificationFailed)):
        return 502, "verification_error"
    return 500, "server_error"


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_of(exc: P2PInferError) -> tuple[int, dict[str, Any]]:
    status, kind = error_status(exc)
    code = "model_not_found" if isinstance(exc, UnknownModel) else exc.code
    return status, error_body(exc.message, kind, code, getattr(exc, "param", None))
