"""What the control API and the gateway share: the ``HOST:PORT`` a server binds (loopback
unless asked otherwise) and running an ASGI app under hypercorn's trio worker inside the
caller's nursery."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import ConfigError, ListenError


@dataclass(frozen=True)
class Bind:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_bind(text: str, *, allow_public: bool = False, flag: str = "--api", public_flag: str = "--api-public") -> Bind:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6). A non-loopback host is refused unless the
    operator said so explicitly (``public_flag``): these servers have no authentication."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8470")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: HOST must be an IP address or localhost") from None
    if not is_loopback(host) and not allow_public:
        raise ConfigError(f"{flag} {text!r} is not a loopback address: this HTTP API has no authentication, so "
                          f"binding {host} needs {public_flag} as well")
    return Bind(host, int(port_text))


def hypercorn_config(bind: Bind) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [str(bind)]
    config.accesslog = None
    config.errorlog = logging.getLogger("p2p_infer.http")  # quiet unless the logging module is set up
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    return config


async def serve_asgi(app: Any, bind: Bind, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until cancelled; ``nursery.start`` returns the URL it listens on
    (the real port when ``bind.port`` is 0), or raises ListenError if it cannot bind."""
    from hypercorn.trio import serve

    async def started(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, hypercorn_config(bind), task_status=task_status)

    async with trio.open_nursery() as nursery:
        try:
            urls = await nursery.start(started)
        except (OSError, BaseExceptionGroup) as exc:  # hypercorn binds inside its own nursery
            cause = _os_error(exc)
            if cause is None:
                raise
            raise ListenError(f"cannot listen on {bind}: {cause.strerror or cause}") from None
        task_status.started(urls[0])


def _os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found, rest = exc.split(OSError)
        if found is not None and rest is None:
            leaf: BaseException = found
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, OSError) else None
    return None
