"""Error types shared by every layer.

Each error carries a short machine-readable ``code`` that travels in protocol error
replies (see ``protocols/framing.md``), so a remote failure keeps its meaning.
"""

from __future__ import annotations


class P2PInferError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FrameError(P2PInferError):
    """A frame on the wire is malformed, truncated or too large."""

    code = "bad_frame"


class FrameTooLarge(FrameError):
    code = "frame_too_large"


class ProtocolViolation(P2PInferError):
    """A well-formed frame holds a message the protocol does not allow."""

    code = "bad_request"


class RecordError(P2PInferError):
    """A capability record failed verification (signature, binding, time, schema)."""

    code = "bad_record"


class UnknownModel(P2PInferError):
    code = "unknown_model"


class ManifestMismatch(P2PInferError):
    """Weights on disk do not hash to what the model manifest pins."""

    code = "manifest_mismatch"


class NotServed(P2PInferError):
    """The peer does not serve the requested layer range."""

    code = "not_served"


class BadTensor(P2PInferError):
    """A tensor on the wire has a wrong dtype, shape, size or non-finite values."""

    code = "bad_tensor"


class Overloaded(P2PInferError):
    code = "overloaded"


class RemoteError(P2PInferError):
    """A peer answered with an error reply; ``code`` is the peer's code."""

    def __init__(self, code: str, message: str, peer: str = "") -> None:
        super().__init__(f"{peer + ': ' if peer else ''}{code}: {message}")
        self.code = code
        self.peer = peer
        self.remote_message = message


class NoRoute(P2PInferError):
    """No set of live peers covers the layers a query still needs."""

    code = "no_route"


class PeerUnreachable(P2PInferError):
    code = "unreachable"
