"""Puzzle-solved identities for simulated peers, cached on disk across runs.

Each identity costs ~2**PUZZLE_DIFFICULTY key derivations (~0.16 CPU-s here), so 10,000
simulated peers would spend ~27 CPU-min before the first event. The pool keeps the seeds
(32 bytes each, never in git) under the cache directory, grows only as far as a run needs,
and re-checks every loaded key against the puzzle (one hash each), so a corrupt or
tampered cache cannot hand the model identities a real verifier would refuse.
"""

from __future__ import annotations

from pathlib import Path

from ..config import default_cache_dir
from ..errors import SimulationError
from ..identity import Identity

SEED_BYTES = 32


def pool_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "sim-identities.bin"


class IdentityPool:
    """Identity ``i`` is the same on every run that shares the cache; made on first use."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or pool_path()
        self._ids: list[Identity] = []
        self.generated = 0  # made in this process (the rest came from the cache)
        if self.path.exists():
            raw = self.path.read_bytes()
            for off in range(0, len(raw) - len(raw) % SEED_BYTES, SEED_BYTES):
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
            while len(self._ids) < n:
                identity = Identity.generate()
                out.write(identity.seed)
                out.flush()  # a killed run keeps what it made
                self._ids.append(identity)
                self.generated += 1
