"""The block client under asyncio: many requests in flight from coroutines.

:class:`AsyncBlockClient` wraps a :class:`~pvbus.frontend.blk.BlockClient`: each request
becomes a future; the call eventfds are watched with ``loop.add_reader`` and completions
resolve the futures. Requests submitted in the same event-loop iteration share one kick
(section 2.7.13.4: the driver may batch). A full queue makes the coroutine wait for a free
slot. If the backend goes away every pending request fails with
:class:`~pvbus.frontend.BackendDisconnectedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from pvbus.frontend._connection import FrontendError
from pvbus.frontend._memory import GuestBuffer
from pvbus.frontend.blk import (
    BlockClient,
    BlockQueue,
    Completion,
    QueueFullError,
)
from pvbus.virtio.blk import F_FLUSH
from pvbus.virtio.constants import bit


class AsyncBlockClient:
    """asyncio interface to a connected :class:`BlockClient` (it owns the client)."""

    def __init__(self, client: BlockClient, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.client = client
        self.loop = loop or asyncio.get_running_loop()
        self._next_queue = 0
        self._to_kick: set[int] = set()
        self._kick_scheduled = False
        self._space = asyncio.Event()
        self._pending: set[asyncio.Future[Completion]] = set()
        self._error: FrontendError | None = None
        for i, q in enumerate(client.queues):
            self.loop.add_reader(q.fq.call_fd, self._on_call, i)
        self.loop.add_reader(client.frontend.sock.fileno(), self._on_socket)
        self.closed = False

    @classmethod
    async def connect(cls, path: str, **kwargs: Any) -> AsyncBlockClient:
        """Connect like :meth:`BlockClient.connect` (set-up runs in a worker thread)."""
        client = await asyncio.to_thread(BlockClient.connect, path, **kwargs)
        return cls(client)

    async def __aenter__(self) -> AsyncBlockClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def capacity(self) -> int | None:
        return self.client.capacity

    # -- plumbing ---------------------------------------------------------------------------

    def _on_call(self, index: int) -> None:
        q = self.client.queues[index]
        q.fq.ack_calls()
        for done in q.reap():
            fut: asyncio.Future[Completion] = done.tag
            self._pending.discard(fut)
            if not fut.done():
                fut.set_result(done)
        self._space.set()

    def _on_socket(self) -> None:
        try:
            self.client.frontend.check_alive()
        except FrontendError as err:
            self._fail(err)

    def _fail(self, err: FrontendError) -> None:
        self._error = err
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.client.frontend.sock.fileno())
        for fut in self._pending:
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._space.set()

    def _flush_kicks(self) -> None:
        self._kick_scheduled = False
        queues = self.client.queues
        for i in self._to_kick:
            queues[i].kick()
        self._to_kick.clear()

    async def _request(self, submit: Callable[[BlockQueue, Any], None]) -> Completion:
        queues = self.client.queues
        while True:
            if self._error is not None:
                raise self._error
            if self.closed:
                raise FrontendError("the client is closed")
            index = self._next_queue
            self._next_queue = (index + 1) % len(queues)
            fut: asyncio.Future[Completion] = self.loop.create_future()
            try:
                submit(queues[index], fut)
            except QueueFullError:
                self._space.clear()
                await self._space.wait()
                continue
            break
        self._pending.add(fut)
        self._to_kick.add(index)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self.loop.call_soon(self._flush_kicks)
        done = await fut
        return done.check()

    # -- requests ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        done = await self._request(lambda q, t: q.submit_read(offset, length, t))
        return done.data or b""

    async def readinto(self, offset: int, buf: GuestBuffer) -> None:
        """Read into a guest buffer with no copy."""
        await self._request(lambda q, t: q.submit_read(offset, buf, t))

    async def write(self, offset: int, data: bytes | memoryview | GuestBuffer) -> None:
        """Write ``data`` at ``offset``."""
        await self._request(lambda q, t: q.submit_write(offset, data, t))

    async def flush(self) -> None:
        """Flush the device's write cache (a no-op without VIRTIO_BLK_F_FLUSH)."""
        if self.client.features & bit(F_FLUSH):
            await self._request(lambda q, t: q.submit_flush(t))

    async def discard(self, offset: int, length: int) -> None:
        await self._request(lambda q, t: q.submit_discard(offset, length, t))

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        await self._request(lambda q, t: q.submit_write_zeroes(offset, length, unmap=unmap, tag=t))

    async def get_id(self) -> str:
        done = await self._request(lambda q, t: q.submit_get_id(t))
        return (done.data or b"").split(b"\0", 1)[0].decode(errors="replace")

    async def close(self) -> None:
        """Fail what is still pending, stop watching the fds and disconnect."""
        if self.closed:
            return
        self.closed = True
        for q in self.client.queues:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(q.fq.call_fd)
        if self._error is None:
            self._fail(FrontendError("the client was closed"))
        self.client.close()


__all__ = ["AsyncBlockClient"]
