"""``p2p-infer simulate SCENARIO.toml --out DIR`` (registered in ``p2p_infer/cli.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run a network simulation scenario (simulations/*.toml) and write its report")
    p.add_argument("scenario", type=Path, help="a scenario TOML file")
    p.add_argument("--out", type=Path, required=True, help="directory for report.json, report.md and the PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-check", action="store_true", help="exit 0 even when an invariant is broken (the report still says so)")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def cmd_simulate(args: argparse.Namespace, _settings: Any) -> int:
    import signal

    from ..logs import configure_logging
    from .runner import simulate

    configure_logging("console", "warning")  # the progress line and the report say what happened; warnings still show

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the engine's finally: every process is stopped

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    report = simulate(args.scenario, args.out, progress=not args.quiet, plots=not args.no_plots, check=not args.no_check)
    keys = ("queries_sent", "queries_answered", "queries_failed", "wrong_accepted", "latency_ms", "processes_left")
    sys.stdout.write(json.dumps({k: report[k] for k in keys if k in report}) + "\n")
    return 0
