"""Run a scenario on its engine, write the report, and check the invariants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .record import RunData
from .report import enforce, write_report
from .scenario import Scenario, load_scenario


def run_engine(sc: Scenario, out: Path, progress: bool = True) -> RunData:
    if sc.engine == "processes":
        from .process_engine import ProcessRun

        return ProcessRun(sc, out, progress).run()
    from .des.engine import DesRun

    return DesRun(sc, progress).run()


def simulate(path: Path, out: Path, *, progress: bool = True, plots: bool = True, check: bool = True) -> dict[str, Any]:
    """Load ``path``, run it, write report.json / report.md / PNGs into ``out``; raise
    :class:`InvariantBroken` (after writing the report) when ``check`` and one is broken."""
    sc = load_scenario(path)
    out.mkdir(parents=True, exist_ok=True)
    data = run_engine(sc, out, progress)
    report, broken = write_report(data, out, plots)
    if check:
        enforce(broken, out)
    return report
