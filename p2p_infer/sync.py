"""The client from plain scripts and from asyncio: trio runs in a background thread.

    import p2p_infer

    with p2p_infer.connect(bootstrap=["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW..."]) as client:
        result = client.embed(["first text", "second text"])   # one batched query
        print(result.numpy().shape)                             # (2, 384)

``connect`` returns one object for every style: ``with`` (blocking calls), ``async with``
under asyncio (awaitable calls, cancellable), ``async with`` under trio (the native
:class:`~p2p_infer.node.client.Client`, no thread). The library's :class:`Client` is trio;
here one trio loop in a daemon thread owns it for its whole life (a nursery must be
entered and left by one task), and each call is a task in that loop whose result comes
back through a :class:`concurrent.futures.Future`. Ctrl-C in a blocking call cancels that
call's task and re-raises; leaving the ``with`` closes the client and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import structlog
import trio

from .errors import ClientClosed, UsageError
from .node.client import Client
from .node.results import QueryResult

CallFn = Callable[..., Awaitable[Any]]
CLOSE_TIMEOUT = 60.0  # seconds leaving waits for the client to close (pending optimistic checks finish first)
# After Ctrl-C: cancel everything and wait this long before handing control back. Shielded
# clean-up can outlast it (a generation tells its peers to drop their KV caches, <= 5 s);
# the daemon thread then finishes that on its own: wait_closed() waits for it.
ABORT_TIMEOUT = 2.0
log = structlog.get_logger("p2p_infer.client")


class _Portal:
    """One trio loop in a background thread, owning one :class:`Client`, running calls as tasks."""

    def __init__(self, bootstrap: Sequence[str], options: dict[str, Any]) -> None:
        self._bootstrap, self._options = list(bootstrap), options
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._token_ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="p2p-infer-trio", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._root: trio.CancelScope | None = None
        self._calls: trio.Nursery | None = None
        self._closing: trio.Event | None = None
        self._scopes: dict[int, trio.CancelScope] = {}
        self.client: Client | None = None
        self.closed = False

    # ---- the trio side ----

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - handed to the opener, never lost in the thread
            if not self._opened.done():
                self._opened.set_exception(exc)
            else:
                log.warning("client loop ended with an error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._token_ready.set()
            if not self._opened.done():
                self._opened.set_exception(ClientClosed("the client stopped before it was ready"))

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._closing = trio.Event()
        with trio.CancelScope() as root:
            self._root = root
            self._token_ready.set()
            async with Client(self._bootstrap, **self._options) as client:
                self.client = client
                async with trio.open_nursery() as calls:
                    self._calls = calls
                    self._opened.set_result(None)
                    await self._closing.wait()
                    calls.cancel_scope.cancel()  # calls still running when the client closes

    async def _run_call(self, future: concurrent.futures.Future[Any], fn: CallFn, args: tuple[Any, ...]) -> None:
        with trio.CancelScope() as scope:
            self._scopes[id(future)] = scope
            try:
                if not future.set_running_or_notify_cancel():
                    return
                assert self.client is not None
                future.set_result(await fn(self.client, *args))
            except trio.Cancelled:
                future.set_exception(concurrent.futures.CancelledError())
                raise
            except BaseException as exc:  # noqa: BLE001 - the caller re-raises it in its own thread
                future.set_exception(exc)
            finally:
                self._scopes.pop(id(future), None)

    # ---- the caller's side (any thread) ----

    def open(self) -> None:
        self._thread.start()
        try:
            self._opened.result()
        except KeyboardInterrupt:
            self.abort()
            raise
        except BaseException:
            self._thread.join(ABORT_TIMEOUT)
            self.closed = True
            raise

    def submit(self, fn: CallFn, *args: Any) -> concurrent.futures.Future[Any]:
        """Start ``await fn(client, *args)`` in the loop; its outcome comes back in the future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.closed or self._calls is None:
            raise ClientClosed("the client is closed")
        try:
            trio.from_thread.run_sync(self._calls.start_soon, self._run_call, future, fn, args, trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError) as exc:
            raise ClientClosed(f"the client's loop has stopped ({exc})") from None
        return future

    def call(self, fn: CallFn, *args: Any) -> Any:
        future = self.submit(fn, *args)
        try:
            return future.result()
        except KeyboardInterrupt:  # Ctrl-C: the call's task is cancelled, the caller sees the interrupt
            self.cancel(future)
            raise

    def cancel(self, future: concurrent.futures.Future[Any]) -> None:
        if future.cancel():
            return
        scope = self._scopes.get(id(future))
        if scope is not None:
            self._in_loop(scope.cancel)

    def _in_loop(self, fn: Callable[[], Any]) -> None:
        try:
            trio.from_thread.run_sync(fn, trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError):
            pass  # the loop already stopped: nothing left to cancel

    def abort(self) -> None:
        """Cancel everything (Ctrl-C, or a close that does not finish) and wait for the thread."""
        self._token_ready.wait(ABORT_TIMEOUT)
        if self._root is not None:
            self._in_loop(self._root.cancel)
        self._thread.join(ABORT_TIMEOUT)
        self.closed = True

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait for the loop's thread to end (after close, or an abort's clean-up); True once it has."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        if self.closed:
            return
        self.closed = True
        if self._closing is not None:
            self._in_loop(self._closing.set)
        try:
            self._thread.join(timeout)
        except KeyboardInterrupt:
            self.abort()
            raise
        if self._thread.is_alive():
            self.abort()
            self._thread.join(CLOSE_TIMEOUT)  # a close that is not interrupted leaves no thread


# What each client style runs in the loop: plain coroutine functions of the trio client.


async def _embed(client: Client, texts: Any) -> QueryResult:
    return await client.embed(texts)


async def _classify(client: Client, pixels: Any) -> QueryResult:
    return await client.classify(pixels)


async def _run(client: Client, model: str, inputs: Any) -> QueryResult:
    return await client.run(model, inputs)


async def _wait_check(client: Client, result: QueryResult) -> Any:
    return None if result.check is None else await result.check


async def _verify_followed(client: Client, result: QueryResult) -> dict[str, Any]:
    return await client.verify_followed(result)


async def _pump(client: Client, prompt: str, options: dict[str, Any], deliver: Callable[[Any], None]) -> None:
    async for piece in client.generate(prompt, **options):
        deliver(piece)


class SyncClient:
    """Blocking calls on a client whose trio loop runs in a background thread."""

    def __init__(self, bootstrap: Sequence[str] | str, **options: Any) -> None:
        self._portal = _Portal(_addrs(bootstrap), options)

    def __enter__(self) -> SyncClient:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._portal.abort()  # Ctrl-C: leave now, cancelling what is in flight
        else:
            self.close()

    def open(self) -> None:
        """Join the network (blocks until the client is ready, or raises why it is not)."""
        self._portal.open()

    def close(self) -> None:
        """Leave: pending optimistic checks finish, the host closes, the thread is joined."""
        self._portal.close()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """After Ctrl-C left the ``with`` at once: wait for the background clean-up to end."""
        return self._portal.wait_closed(timeout)

    @property
    def client(self) -> Client:
        """The trio client underneath (its attributes only; call it through this object)."""
        if self._portal.client is None:
            raise ClientClosed("the client is not open")
        return self._portal.client

    def embed(self, texts: str | Sequence[str]) -> QueryResult:
        return self._portal.call(_embed, texts)

    def classify(self, pixels: Any) -> QueryResult:
        return self._portal.call(_classify, pixels)

    def run(self, model: str, inputs: Any) -> QueryResult:
        return self._portal.call(_run, model, inputs)

    def wait_check(self, result: QueryResult) -> Any:
        """Optimistic mode: block until the check drawn after ``result`` has finished; its report."""
        return self._portal.call(_wait_check, result)

    def verify_followed(self, result: QueryResult) -> dict[str, Any]:
        return self._portal.call(_verify_followed, result)

    def generate(self, prompt: str, **options: Any) -> Iterator[Any]:
        """Pieces of generated text as they arrive; leaving the loop early stops the generation."""
        pieces: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        future = self._portal.submit(_pump, prompt, options, lambda piece: pieces.put((True, piece)))
        future.add_done_callback(lambda _: pieces.put((False, None)))  # after every piece
        try:
            while True:
                more, piece = pieces.get()
                if not more:
                    future.result()  # raises what the generation failed with
                    return
                yield piece
        finally:
            if not future.done():
                self._portal.cancel(future)


class AsyncioClient:
    """The same calls as awaitables for asyncio code; cancelling an await cancels the query."""

    def __init__(self, bootstrap: Sequence[str] | str, **options: Any) -> None:
        self._portal = _Portal(_addrs(bootstrap), options)

    async def __aenter__(self) -> AsyncioClient:
        await asyncio.to_thread(self._portal.open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._portal.close)

    async def _await(self, fn: CallFn, *args: Any) -> Any:
        future = self._portal.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self._portal.cancel(future)
            raise

    async def embed(self, texts: str | Sequence[str]) -> QueryResult:
        return await self._await(_embed, texts)

    async def classify(self, pixels: Any) -> QueryResult:
        return await self._await(_classify, pixels)

    async def run(self, model: str, inputs: Any) -> QueryResult:
        return await self._await(_run, model, inputs)

    async def wait_check(self, result: QueryResult) -> Any:
        return await self._await(_wait_check, result)

    async def verify_followed(self, result: QueryResult) -> dict[str, Any]:
        return await self._await(_verify_followed, result)

    async def generate(self, prompt: str, **options: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
        deliver = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, (True, piece))  # noqa: E731
        future = self._portal.submit(_pump, prompt, options, deliver)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, (False, None)))
        try:
            while True:
                more, piece = await pieces.get()
                if not more:
                    future.result()
                    return
                yield piece
        finally:
            if not future.done():
                self._portal.cancel(future)


class Connection:
    """What :func:`connect` returns: ``with`` gives a :class:`SyncClient`; ``async with`` gives
    an :class:`AsyncioClient` under asyncio, or the native trio :class:`Client` under trio."""

    def __init__(self, bootstrap: Sequence[str] | str, options: dict[str, Any]) -> None:
        self._bootstrap, self._options = _addrs(bootstrap), options
        self._open: Any = None

    def __enter__(self) -> SyncClient:
        self._open = SyncClient(self._bootstrap, **self._options)
        return self._open.__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: Any) -> None:
        self._open.__exit__(*exc)

    async def __aenter__(self) -> Any:
        import sniffio

        library = sniffio.current_async_library()
        if library == "trio":
            self._open = Client(self._bootstrap, **self._options)
        elif library == "asyncio":
            self._open = AsyncioClient(self._bootstrap, **self._options)
        else:
            raise UsageError(f"p2p_infer.connect runs under trio, asyncio or plain code, not {library}")
        return await self._open.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await self._open.__aexit__(*exc)


def connect(bootstrap: Sequence[str] | str, **options: Any) -> Connection:
    """A client joined through ``bootstrap`` (one multiaddr or several); ``options`` are
    :class:`~p2p_infer.node.client.Client`'s (``unverified=True``, ``optimistic=0.1``, ...)."""
    return Connection(bootstrap, options)


def _addrs(bootstrap: Sequence[str] | str) -> list[str]:
    addrs = [bootstrap] if isinstance(bootstrap, str) else list(bootstrap)
    if not addrs:
        raise UsageError("connect needs at least one bootstrap multiaddr")
    return addrs
