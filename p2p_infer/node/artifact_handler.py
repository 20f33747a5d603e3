"""The artifact protocol's handler (``/p2p-infer/artifact/1.0.0``): ZK verifier artifacts
(settings, verifying keys, SRS) by SHA-256, never proving keys. Spec: ``protocols/artifact.md``."""

from __future__ import annotations

import trio

from ..config import default_cache_dir
from ..errors import ArtifactNotFound, ProtocolViolation
from ..proto.wire import ARTIFACT, ARTIFACT_PROTOCOL, Message, expect


async def handle_artifact(message: Message) -> Message:
    from ..verify import zk

    expect(ARTIFACT_PROTOCOL, message)
    sha = message.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ProtocolViolation("artifact: needs {type: artifact, sha256: 64 hex}")
    path = await trio.to_thread.run_sync(zk.ArtifactStore(default_cache_dir()).find, sha)
    if path is None:
        raise ArtifactNotFound(f"no artifact {sha[:16]}... here")
    return {"type": ARTIFACT, "sha256": sha, "data": path.read_bytes()}
