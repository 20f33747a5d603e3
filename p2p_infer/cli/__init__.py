"""``p2p-infer``: the command line (click).

Layout: :mod:`.app` holds the click group ``cli``, the option sets commands share (``common``,
``network``) and the one error boundary :func:`main` (one ``error: ...`` line on stderr; exit 1
runtime failure, 2 usage or configuration error, 130 interrupted; a traceback only with
``--debug`` or ``P2P_INFER_DEBUG=1``). :mod:`.params` checks arguments before torch is
imported or the network joined. Each command group lives in its own module.

Adding a command: write a module that decorates a function with ``@cli.command("NAME")``
(from :mod:`p2p_infer.cli.app`) plus ``@common`` / ``@network`` and the command's own
click options, whose body is ``return run("NAME", handler, values)`` with
``handler(args, settings) -> int`` (``args`` is a namespace of the flags; ``settings``
the layered :class:`p2p_infer.config.Settings`). Import torch, trio and libp2p inside the
handler, never at module level. Then add the module's dotted name to ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
from typing import Any

from .app import cli, main, make_args, settings_from

COMMAND_MODULES = [
    "p2p_infer.cli.node",  # id, peer, bootstrap
    "p2p_infer.cli.listing",  # peers, models
    "p2p_infer.cli.query",  # query
    "p2p_infer.cli.offline",  # verify, audit
    "p2p_infer.cli.config_cmd",  # config init|show
    "p2p_infer.cli_generate",  # generate, chat
    "p2p_infer.sim.cli",  # simulate
    "p2p_infer.cli_gateway",  # gateway, status (and peer --api)
]


class _Parser:
    """``build_parser().parse_args(argv)``: the flags of one command as a namespace, parsed by click
    (for tests and tools that call a command's handler directly)."""

    def parse_args(self, argv: list[str]) -> argparse.Namespace:
        from .app import _register

        _register()
        ctx = cli.make_context("p2p-infer", list(argv), resilient_parsing=False)
        name, command, rest = cli.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
        assert command is not None and name is not None
        sub = command.make_context(name, rest, parent=ctx)
        values = dict(sub.params)
        for flag in ("json_out", "input_"):
            if flag in values:
                values[flag.rstrip("_").replace("_out", "")] = values.pop(flag)
        return make_args(name, values)


def build_parser() -> _Parser:
    return _Parser()


def cmd_verify(args: argparse.Namespace, settings: Any) -> int:
    from .offline import cmd_verify as verify

    return verify(args, settings)


__all__ = ["COMMAND_MODULES", "build_parser", "cli", "cmd_verify", "main", "settings_from"]
