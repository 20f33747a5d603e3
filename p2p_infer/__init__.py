"""p2p-infer: decentralized, verifiable split inference over a libp2p overlay.

The public face (the rest is importable but not promised)::

    from p2p_infer import Client

    async with Client(["/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo..."]) as client:
        result = await client.embed("a sentence")

Layers, lowest first; each imports only those below it (docs/architecture.md):
``proto/`` (sans-IO protocol logic), ``ml/`` (models, tensors), ``net/`` (libp2p, trio),
``verify/`` (ZK), ``node/`` (peer and client drivers), ``testing/`` (harness, adversaries).
"""

from __future__ import annotations

from typing import Any

from .errors import (
    NoQuorum,
    NoRoute,
    P2PInferError,
    PeerUnreachable,
    RemoteError,
    UnsupportedMode,
)

__version__ = "0.1.0"

# Heavy names (torch, trio, libp2p behind them) load on first use, so `import p2p_infer`
# and the CLI's fast paths stay fast.
_LAZY = {
    "Client": "p2p_infer.node.client",
    "connect": "p2p_infer.node.client",
    "QueryResult": "p2p_infer.node.results",
    "HopReport": "p2p_infer.node.results",
    "QueryPlan": "p2p_infer.proto.plan",
    "Peer": "p2p_infer.node.peer",
    "Settings": "p2p_infer.config",
    "Identity": "p2p_infer.identity",
}

__all__ = ["NoQuorum", "NoRoute", "P2PInferError", "PeerUnreachable", "RemoteError", "UnsupportedMode", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'p2p_infer' has no attribute {name!r}")
