"""A TCP proxy that a test can cut and restore, to take a server away and bring it back.

    with Proxy("127.0.0.1", 6379) as proxy:
        broker = connect(f"redis://127.0.0.1:{proxy.port}")
        proxy.cut()       # every connection dropped; new ones are closed as they come
        proxy.restore()   # forwarding again
        proxy.cut_after(b"COMMIT")  # cut once a client sent that, before any answer

The proxy runs an event loop of its own on a thread of its own: it forwards whatever the
test's loop is doing (blocked or not), and a test calls it from sync or async code alike.
Each method returns once done: after `cut()`, no byte goes through until `restore()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

_Link = tuple[asyncio.StreamWriter, asyncio.StreamWriter]  # the client's, the server's


class Proxy:
    """Forwards connections to `127.0.0.1:{port}` on to `host:port`; see the module docstring.

    `accepted` counts the connections forwarded, `refused` those closed while cut (a
    client trying to reconnect during the outage).
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.accepted = 0
        self.refused = 0
        self._cut = False
        self._marker: bytes | None = None
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"proxy to {host}:{port}", daemon=True
        )

    def __repr__(self) -> str:
        state = "cut" if self._cut else "forwarding"
        return f"<Proxy 127.0.0.1:{self.port} to {self.target[0]}:{self.target[1]}, {state}>"

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (`self.port`) and forward."""
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._forward, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Drop every connection, both ends, and close new ones as soon as they come."""
        self._call(self._cut_all())

    def cut_after(self, marker: bytes) -> None:
        """Cut (as `cut`) as soon as a client sends bytes with `marker` in them, once.

        Those bytes reach the server, and no answer reaches the client: a COMMIT that
        the server carries out and whose answer is lost, say, a moment too short for a
        test to hit with `cut`.
        """
        self._call(self._arm(marker))

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut = False

    def close(self) -> None:
        """Drop every connection, stop listening and end the proxy's thread."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # On the proxy's loop ----------------------------------------------------------------

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(10)

    async def _forward(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            to_client.transport.abort()
            return
        try:
            server, to_server = await asyncio.open_connection(*self.target)
        except OSError:
            to_client.transport.abort()  # as a client of the server itself would see it
            return
        link = (to_client, to_server)
        if self._cut:  # cut while connecting
            self.refused += 1
            _abort(link)
            return
        self.accepted += 1
        self._links.add(link)
        try:
            await asyncio.gather(_pipe(client, to_server, self._sent), _pipe(server, to_client))
        finally:
            self._links.discard(link)
            _abort(link)

    async def _arm(self, marker: bytes) -> None:
        self._marker = marker

    def _sent(self, data: bytes) -> None:
        """A client's bytes, just written to the server: cut if they have the marker."""
        if self._marker is not None and self._marker in data:
            self._marker = None
            self._cut_now()

    async def _cut_all(self) -> None:
        self._cut_now()

    def _cut_now(self) -> None:
        self._cut = True
        for link in list(self._links):
            _abort(link)

    async def _shutdown(self) -> None:
        await self._cut_all()
        if self._server is not None:
            self._server.close()
        # The dropped connections' tasks end on their own, at once. Cancel only what does
        # not (a connection to the server still being made): Python 3.11's asyncio logs
        # an error for every cancelled connection task.
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def _pipe(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    sent: Callable[[bytes], None] | None = None,
) -> None:
    """Copy bytes until either end closes; then close the sink, flushing what it holds.

    `sent` sees each chunk once written, before the loop forwards anything else.
    """
    try:
        while data := await source.read(65536):
            sink.write(data)
            if sent is not None:
                sent(data)
            await sink.drain()
    except OSError:
        pass  # reset, or aborted by a cut: `_forward` aborts both ends
    finally:
        sink.close()


def _abort(link: _Link) -> None:
    for writer in link:
        writer.transport.abort()
