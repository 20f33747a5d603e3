"""``p2p-infer simulate SCENARIO.toml --out DIR`` (listed in ``p2p_infer/cli/__init__.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import click

from ..cli.app import cli, make_args


@cli.command("simulate")
@click.argument("scenario", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="directory for report.json, report.md and the PNG plots")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@click.option("--no-check", is_flag=True, help="exit 0 even when an invariant is broken (the report still says so)")
@click.option("--quiet", is_flag=True, help="no progress line")
def simulate_command(**values: Any) -> int:
    """Run a network simulation scenario (simulations/*.toml) and write its report."""
    return cmd_simulate(make_args("simulate", values), None)


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
