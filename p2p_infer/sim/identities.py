"""Puzzle-solved identities for simulated peers, the same on every machine, cached on disk.

Each identity costs ~2**PUZZLE_DIFFICULTY key derivations (~0.16 CPU-s here), so 10,000
simulated peers would spend ~27 CPU-min before the first event. The pool keeps the seeds
(32 bytes each, never in git) under the cache directory, grows only as far as a run needs,
and re-checks every loaded key against the puzzle (one hash each), so a corrupt or
tampered cache cannot hand the model identities a real verifier would refuse.

Identity ``i`` is derived, not drawn: the first seed ``H(i, j)``, j = 0, 1, ..., whose key
solves the puzzle. A fresh clone (an empty cache) therefore simulates the same peers, the
same VRF draws and the same counts as any other machine (with random keys a DES test's
counts moved with whatever keys the cache happened to hold: 21 wrong plain answers here,
12 in a clean CI clone).
"""

from __future__ import annotations

import fcntl
import hashlib
from itertools import count
from pathlib import Path

from nacl.bindings import crypto_sign_seed_keypair

from ..config import default_cache_dir
from ..errors import SimulationError
from ..identity import Identity, solves_puzzle

SEED_BYTES = 32


def pool_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "sim-identities-v2.bin"  # v1 held random keys


class IdentityPool:
    """Identity ``i`` is the same on every run that shares the cache; made on first use."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or pool_path()
        self._ids: list[Identity] = []
        self.generated = 0  # made in this process (the rest came from the cache)
        if self.path.exists():
            self._load(self.path.read_bytes())

    def _load(self, raw: bytes) -> None:
        """Take the cached seeds past those already held (each checked against the puzzle)."""
        for off in range(len(self._ids) * SEED_BYTES, len(raw) - len(raw) % SEED_BYTES, SEED_BYTES):
            identity = Identity.from_seed(raw[off: off + SEED_BYTES])
            if not identity.solves_puzzle:
                raise SimulationError(f"{self.path}: seed {off // SEED_BYTES} does not solve the identity puzzle; delete the file")
            self._ids.append(identity)

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, index: int) -> Identity:
        if index >= len(self._ids):
            self.grow(index + 1)
        return self._ids[index]

    def grow(self, n: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as out:
            fcntl.flock(out, fcntl.LOCK_EX)  # two runs growing the cache at once append in turn, never interleaved
            self._load(self.path.read_bytes())  # what another run added meanwhile
            while len(self._ids) < n:
                identity = derived_identity(len(self._ids))
                out.write(identity.seed)
                out.flush()  # a killed run keeps what it made
                self._ids.append(identity)
                self.generated += 1


def derived_identity(index: int) -> Identity:
    """Simulated peer ``index``'s identity: the first derived seed that solves the puzzle."""
    for attempt in count():
        seed = hashlib.sha256(b"p2p-infer/sim-identity/v2" + index.to_bytes(8, "big") + attempt.to_bytes(8, "big")).digest()
        public, _ = crypto_sign_seed_keypair(seed)  # the cheapest Ed25519 derivation, as in Identity.generate
        if solves_puzzle(public):
            return Identity(seed=seed, public_key=public)
    raise AssertionError("unreachable")
