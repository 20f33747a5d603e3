"""The click group, the option sets commands share, and the one error boundary (:func:`main`)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..config import SETTING_FLAGS, Settings, load_settings
from ..errors import ConfigError, P2PInferError, UsageError, first_leaf
from . import params

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


@click.group(context_settings=CONTEXT, help="Run a peer or a bootstrap peer, list peers and models, query the network.")
@click.version_option(__version__, "--version", "-V", prog_name="p2p-infer", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, hidden=True, help="print tracebacks (also P2P_INFER_DEBUG=1)")
def cli(debug: bool) -> None:
    pass


def options(*decorators: Decorator) -> Decorator:
    """Apply option decorators in the order they are listed (click applies them bottom-up)."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


common = options(
    click.option("--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML file of settings (flags and P2P_INFER_* env vars override it)"),
    click.option("--key", type=click.Path(path_type=Path, dir_okay=False), help="Ed25519 key file (created on first run, mode 0600)"),
    click.option("--log-format", type=click.Choice(["console", "json"])),
    click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"])),
    click.option("--debug", is_flag=True, hidden=True),
)

network = options(
    click.option("--bootstrap", multiple=True, type=params.PEER_ADDR, metavar="MULTIADDR", help="bootstrap peer (repeatable)"),
    click.option("--bootstrap-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                 help="file of bootstrap multiaddrs (default bootstrap/peers.txt if present)"),
    click.option("--listen", type=params.LISTEN_ADDR, metavar="MULTIADDR", help="listen address (default /ip4/127.0.0.1/tcp/0)"),
)


def make_args(command: str, values: dict[str, Any]) -> argparse.Namespace:
    """The parsed flags as a namespace (``args.command`` names the command); empty repeatables read as None."""
    clean = {k: (None if v == () else list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    return argparse.Namespace(command=command, **clean)


def settings_from(args: argparse.Namespace) -> Settings:
    """Defaults < config file < P2P_INFER_* environment < the flags actually given (config.py)."""
    flags = {name: value for name in SETTING_FLAGS if (value := getattr(args, name, None)) is not None}
    settings = load_settings(getattr(args, "config", None), flags)
    default_file = Path("bootstrap/peers.txt")
    if not settings.bootstrap and settings.bootstrap_file is None and default_file.exists():
        settings.bootstrap_file = default_file
    params.check_settings(settings)
    return settings


def run(command: str, handler: Callable[[argparse.Namespace, Settings], int], values: dict[str, Any]) -> int:
    """What every command body does: settings, logging, then the handler (exit code returned to main)."""
    args = make_args(command, values)
    settings = settings_from(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)  # type: ignore[arg-type]
    return handler(args, settings)


# ---- the error boundary ----

USAGE_ERRORS = (UsageError, ConfigError)  # our own refusals of what was asked: exit 2, like click's


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one ``error:`` line on stderr (traceback only with --debug).
    Exit 0 ok, 1 runtime failure, 2 usage or configuration error, 130 interrupted. As the
    process's entry point (no ``argv``) an interrupt ends the process at once."""
    global _hard_exit
    _hard_exit = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("P2P_INFER_DEBUG", "") not in ("", "0")
    _register()
    try:
        code = cli.main(args=argv, prog_name="p2p-infer", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as done:  # --help, --version
        return done.exit_code
    except click.exceptions.Abort:
        return _interrupted()
    except click.ClickException as exc:
        return _fail(exc.format_message(), _usage_hint(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _interrupted()
    except BaseException as exc:  # noqa: BLE001 - the boundary: one line for everything else
        return _report(exc, debug)


def _report(exc: BaseException, debug: bool) -> int:
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    leaf = unwrap(exc)
    if isinstance(leaf, KeyboardInterrupt):
        return _interrupted()
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(leaf, P2PInferError):
        return _fail(leaf.message, getattr(leaf, "hint", None), 2 if isinstance(leaf, USAGE_ERRORS) else 1)
    if isinstance(leaf, OSError) and leaf.filename is not None:
        return _fail(f"{leaf.strerror or leaf}: {leaf.filename}", None, 1)
    return _fail(f"internal error: {type(leaf).__name__}: {leaf}", None if debug else "run again with --debug for the traceback", 1)


def unwrap(exc: BaseException) -> BaseException:
    """A trio nursery's ExceptionGroup as its Ctrl-C, else its first P2PInferError, else its
    first leaf. Ctrl-C wins: the tasks it cancelled may fail on their way out (a dial cut
    short reports "no bootstrap peer reachable"), and the user asked to stop."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    interrupted, _ = exc.split(KeyboardInterrupt)
    if interrupted is not None:
        return first_leaf(interrupted)
    ours, _ = exc.split(P2PInferError)
    return first_leaf(ours) if ours is not None else first_leaf(exc)


def _fail(message: str, hint: str | None, code: int) -> int:
    line = f"error: {message}" + (f" (hint: {hint})" if hint else "")
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()
    return code


def _usage_hint(exc: click.ClickException) -> str | None:
    ctx = getattr(exc, "ctx", None)
    return f"see '{ctx.command_path} --help'" if ctx is not None else None


_hard_exit = False


def _interrupted() -> int:
    sys.stderr.write("error: interrupted\n")
    sys.stderr.flush()
    if _hard_exit:  # threads abandoned mid-load (torch, weights) would hold the exit for seconds
        sys.stdout.flush()
        os._exit(130)
    return 130


_registered = False


def _register() -> None:
    """Import every command module (each adds its commands to ``cli``); see the package docstring."""
    global _registered
    if not _registered:
        from . import COMMAND_MODULES

        for name in COMMAND_MODULES:
            __import__(name, fromlist=["_"])
        _registered = True
