"""p2p-infer: decentralized, verifiable split inference over a libp2p overlay.

The public face (the rest is importable but not promised)::

    import p2p_infer

    with p2p_infer.connect("/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo...") as client:   # plain code
        result = client.embed(["a sentence", "another"])                          # one batch
        print(result.numpy().shape)

    async with p2p_infer.connect(...) as client:      # under asyncio (awaitable calls) or trio (the trio Client)
        result = await client.embed("a sentence")

The library logs through the standard ``logging`` module (``p2p_infer.*`` loggers) and
prints nothing unless the application configures logging (docs/client.md, "Logging").

Layers, lowest first; each imports only those below it (docs/architecture.md):
``proto/`` (sans-IO protocol logic), ``ml/`` (models, tensors), ``net/`` (libp2p, trio),
``verify/`` (ZK), ``node/`` (peer and client drivers), ``testing/`` (harness, adversaries).
"""

from __future__ import annotations

from typing import Any

from .errors import (
    BatchTooLarge,
    ClientClosed,
    NoQuorum,
    NoRoute,
    P2PInferError,
    PeerUnreachable,
    RemoteError,
    UnsupportedMode,
)

__version__ = "0.1.0"

from .logs import configure_library_logging as _configure_library_logging  # noqa: E402

_configure_library_logging()  # silent unless the application configures logging; the CLI reconfigures

# Heavy names (torch, trio, libp2p behind them) load on first use, so `import p2p_infer`
# and the CLI's fast paths stay fast.
_LAZY = {
    "Client": "p2p_infer.node.client",
    "connect": "p2p_infer.sync",
    "SyncClient": "p2p_infer.sync",
    "AsyncioClient": "p2p_infer.sync",
    "QueryResult": "p2p_infer.node.results",
    "HopReport": "p2p_infer.node.results",
    "QueryPlan": "p2p_infer.proto.plan",
    "Peer": "p2p_infer.node.peer",
    "Settings": "p2p_infer.config",
    "Identity": "p2p_infer.identity",
}

__all__ = ["BatchTooLarge", "ClientClosed", "NoQuorum", "NoRoute", "P2PInferError", "PeerUnreachable", "RemoteError", "UnsupportedMode", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'p2p_infer' has no attribute {name!r}")
