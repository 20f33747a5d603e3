"""The wall clock, read by drivers only: protocol logic in ``proto/`` is handed ``now``."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
