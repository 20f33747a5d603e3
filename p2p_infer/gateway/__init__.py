"""The OpenAI-compatible HTTP gateway (``p2p-infer gateway``) and the HTTP plumbing the
peer's control API shares with it. docs/gateway.md describes the endpoints."""
