"""A query's modes as one value: transport x checks x privacy, validated before anything is sent.

Each axis is an independent choice, and a :class:`QueryPlan` combines them. Not every
combination is built: :meth:`QueryPlan.validate` refuses the ones that are not with an
:class:`~p2p_infer.errors.UnsupportedMode` that names the combination (and the flags that
asked for it), rather than quietly running some other mode. Sans-IO.

Verified by default: ``QueryPlan()`` runs every stage on a committee of ``DEFAULT_K`` = 3.
An unverified query is an explicit choice (``checks=()``, ``unverified=True``, CLI
``--unverified``), and its result is labelled so.

Supported today: ``direct`` with no check, ``spot-check``, ``committee``, ``zk`` or
``optimistic``; ``forwarding`` with no check. ``tee`` is a constraint rather than a check of
its own: it combines with any of them (only attested peers serve the stages; with
``committee``, the committees are TEE-only). Privacy ``threshold`` runs ``direct`` with no
other check (so it needs ``--unverified``: one attested executor per stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import UnsupportedMode
from .sortition import MIN_K

Transport = Literal["direct", "forwarding"]
Check = Literal["none", "spot-check", "committee", "zk", "optimistic", "tee"]
Privacy = Literal["plain", "threshold"]

SUPPORTED: frozenset[tuple[Transport, Check]] = frozenset(
    {("direct", "none"), ("direct", "spot-check"), ("direct", "committee"), ("direct", "zk"), ("direct", "optimistic"),
     ("forwarding", "none")}
)
DEFAULT_K = 3  # the default check: every stage on a committee of 3
VERIFYING: frozenset[str] = frozenset({"committee", "zk"})  # checks that hold the answer until every stage is checked
NOT_BUILT: dict[str, str] = {}
CONSTRAINTS = frozenset({"tee"})  # narrow who serves; compose with every check

# How a user asks for each choice, so an error names what they typed.
FLAGS = {
    "forwarding": "--forwarding",
    "committee": "--committee K",
    "zk": "--mode critical",
    "spot-check": "--spot-check P",
    "optimistic": "--optimistic P",
    "unverified": "--unverified",
    "tee": "--require-tee",
    "threshold": "--enhanced-privacy",
}

# Why a pair of checks cannot run together yet.
CHECK_CONFLICTS = {
    frozenset({"committee", "zk"}): "committee stages do not verify ZK proofs yet, so every proof would be dropped unchecked",
    frozenset({"spot-check", "zk"}): "a proven shard needs no spot check; pick one",
    frozenset({"spot-check", "committee"}): "committee stages are already re-run on k peers; pick one",
    frozenset({"optimistic", "committee"}): "a committee already checks every stage before the answer; pick one",
    frozenset({"optimistic", "zk"}): "a proven shard needs no re-execution; pick one",
    frozenset({"optimistic", "spot-check"}): "both re-run stages on another provider; pick one",
}

# Why forwarding cannot carry a check yet.
FORWARDING_CONFLICTS = {
    "zk": "proofs are collected and checked hop by hop; drop --forwarding",
    "committee": "committee stages are sent from the client (a committee of 3 is the default check); drop --forwarding, "
                 "or add --unverified for an unverified forwarded query",
    "optimistic": "re-executions are sent from the client; drop --forwarding",
    "spot-check": "spot checks re-run stages from the client; drop --forwarding",
}


def _named(choice: str) -> str:
    flag = FLAGS.get(choice)
    return f"{choice} ({flag})" if flag else choice


def _refuse(first: str, second: str, why: str) -> UnsupportedMode:
    flags = " with ".join(FLAGS[c] for c in (first, second) if c in FLAGS)
    return UnsupportedMode(f"unsupported mode: {first} with {second} ({flags}): {why}")


@dataclass(frozen=True)
class QueryPlan:
    """Everything that decides how a query runs, before it runs."""

    transport: Transport = "direct"
    checks: tuple[Check, ...] = ("committee",)  # composable; () is no check (unverified, labelled so)
    privacy: Privacy = "plain"
    committee_k: int | None = None  # members per stage (check committee; DEFAULT_K when not given)
    spot_check: float = 0.0  # probability a stage is re-run on another provider (check spot-check)
    optimistic: float = 0.0  # probability a stage is re-executed after the answer (check optimistic)
    proof_follows: bool = False  # zk: the result first, the proofs collected afterwards
    local_layers: int = 1  # layers the client runs itself, after the embedding
    max_retries: int = 3  # failed hops a query survives
    max_reruns: int = 2  # committee re-runs of a stage without quorum
    trial: bool = True  # a known-answer task to each provider before live traffic

    def __post_init__(self) -> None:
        checks = (self.checks,) if isinstance(self.checks, str) else tuple(self.checks)
        unique = tuple(dict.fromkeys(c for c in checks if c != "none"))
        object.__setattr__(self, "checks", unique)
        if "committee" in unique and self.committee_k is None:
            object.__setattr__(self, "committee_k", DEFAULT_K)

    @classmethod
    def from_options(
        cls,
        *,
        forwarding: bool = False,
        committee: int | None = None,
        critical: bool = False,
        spot_check: float = 0.0,
        optimistic: float | None = None,
        unverified: bool = False,
        proof_follows: bool = False,
        local_layers: int = 1,
        max_retries: int = 3,
        max_reruns: int = 2,
        trial: bool = True,
        require_tee: bool = False,
        enhanced_privacy: bool = False,
    ) -> QueryPlan:
        """The plan the client's keyword arguments (and the CLI's flags) ask for: a committee of
        ``DEFAULT_K`` unless another check, or ``unverified``, is asked for; ``require_tee``
        constrains whichever check that is."""
        checks: list[Check] = []
        if committee is not None:
            checks.append("committee")
        if critical:
            checks.append("zk")
        if spot_check:
            checks.append("spot-check")
        if optimistic is not None:
            checks.append("optimistic")
        if unverified and checks:
            raise _refuse("unverified", checks[0], "an unverified query runs no check; drop one")
        if not checks and not unverified:
            checks.append("committee")  # verified by default
        if require_tee:
            checks.append("tee")  # a constraint on the check above, never in place of it
        return cls(transport="forwarding" if forwarding else "direct", checks=tuple(checks), committee_k=committee,
                   privacy="threshold" if enhanced_privacy else "plain",
                   spot_check=spot_check, optimistic=optimistic or 0.0, proof_follows=proof_follows, local_layers=local_layers,
                   max_retries=max_retries, max_reruns=max_reruns, trial=trial)

    @property
    def check(self) -> Check:
        """The one check this plan runs ("none" without); call after :meth:`validate`."""
        checks = self._proper_checks()
        if len(checks) > 1:
            self.validate()
        return checks[0] if checks else "none"

    @property
    def require_tee(self) -> bool:
        """Only peers with a verified, fresh TEE attestation serve this query's stages."""
        return "tee" in self.checks or self.privacy == "threshold"  # threshold privacy runs on attested executors only

    def _proper_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c not in CONSTRAINTS)

    def describe(self) -> str:
        return "+".join([self.transport, *(self.checks or ("none",)), self.privacy])

    def stage_check(self) -> str:
        """How each stage of this plan is checked, as results label it."""
        check = self.check
        if check == "committee":
            return f"committee k={self.committee_k}"
        if check == "optimistic":
            return f"optimistic p={self.optimistic:g}"
        if check == "spot-check":
            return f"spot-check p={self.spot_check:g}"
        return check

    def validate(self) -> QueryPlan:
        """Raise :class:`UnsupportedMode` naming the first combination not built; else self."""
        self._known_choices()
        self._built_choices()
        self._check_pairs()
        self._transport_and_check()
        self._privacy()
        self._parameters()
        return self

    def _known_choices(self) -> None:
        for axis, value, allowed in (("transport", self.transport, Transport), ("privacy", self.privacy, Privacy)):
            if value not in get_args(allowed):
                raise UnsupportedMode(f"unsupported mode: {axis} {value!r} (known: {', '.join(get_args(allowed))})")
        for check in self.checks:
            if check not in get_args(Check):
                raise UnsupportedMode(f"unsupported mode: check {check!r} (known: {', '.join(get_args(Check))})")

    def _built_choices(self) -> None:
        for choice in (*self.checks, self.privacy):
            if choice in NOT_BUILT:
                raise UnsupportedMode(f"unsupported mode: {_named(choice)}: {NOT_BUILT[choice]} is not built yet")

    def _check_pairs(self) -> None:
        checks = self._proper_checks()
        for i, first in enumerate(checks):
            for second in checks[i + 1:]:
                why = CHECK_CONFLICTS.get(frozenset({first, second}), "these checks do not combine yet")
                raise _refuse(first, second, why)

    def _transport_and_check(self) -> None:
        checks = self._proper_checks()
        check = checks[0] if checks else "none"
        if (self.transport, check) not in SUPPORTED:
            raise _refuse(self.transport, check, FORWARDING_CONFLICTS.get(check, "not built yet"))

    def _privacy(self) -> None:
        if self.privacy == "threshold" and (self.transport != "direct" or self._proper_checks()):
            other = self.transport if self.transport != "direct" else self._proper_checks()[0]
            raise _refuse("threshold", other, "an enhanced-privacy stage runs on one attested executor that decrypts with "
                          "threshold shares; committees, spot checks, proofs and forwarding do not carry ciphertext yet "
                          "(add --unverified to the default committee check)")

    def _parameters(self) -> None:
        checks = set(self.checks)
        if "committee" in checks and (self.committee_k is None or self.committee_k < MIN_K):
            raise UnsupportedMode(f"unsupported mode: committee of k={self.committee_k} (--committee K needs K >= {MIN_K}: docs/consensus.md)")
        if "committee" not in checks and self.committee_k is not None:
            raise UnsupportedMode(f"unsupported mode: committee size k={self.committee_k} without check committee")
        if "spot-check" in checks and not 0.0 < self.spot_check <= 1.0:
            raise UnsupportedMode(f"unsupported mode: spot-check probability {self.spot_check} (must be in (0, 1])")
        if "spot-check" not in checks and self.spot_check:
            raise UnsupportedMode(f"unsupported mode: spot-check probability {self.spot_check} without check spot-check")
        if "optimistic" in checks and not 0.0 < self.optimistic <= 1.0:
            raise UnsupportedMode(f"unsupported mode: optimistic probability {self.optimistic} (--optimistic P needs P in (0, 1])")
        if "optimistic" not in checks and self.optimistic:
            raise UnsupportedMode(f"unsupported mode: optimistic probability {self.optimistic} without check optimistic")
        if self.proof_follows and "zk" not in checks:
            raise UnsupportedMode("unsupported mode: proof_follows without zk (--proof-follows needs --mode critical)")
        if self.local_layers < 1:
            raise UnsupportedMode("unsupported mode: the client runs at least one layer itself (local_layers >= 1)")
        for name in ("max_retries", "max_reruns"):
            if getattr(self, name) < 0:
                raise UnsupportedMode(f"unsupported mode: {name}={getattr(self, name)} (must be >= 0)")
