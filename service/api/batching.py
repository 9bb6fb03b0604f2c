"""Group commit for the API's hot writes (the submission INSERT, the queue write).

`Batcher.submit(item)` queues one item and returns its result; a writer task sends every
item queued so far in one call of `write(items) -> results`, and up to `parallel` such
calls run at once. Nothing waits on a timer: a lone item is written at once, and items
arriving while a call is in flight share the next one, so under load many requests pay
for one round trip (and one statement's fixed cost) together.

If a batch fails, its items are written again one by one unless `shared(exc)` says the
failure was not any one item's doing (say, the server is away): then every item of the
batch gets the exception. So a bad item fails only its own request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 256,
        parallel: int = 2,
        shared: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self._write_batch = write
        self.max_batch = max_batch
        self.parallel = parallel
        self._shared = shared
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._writers: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """Write `item` (with whatever else is queued) and return its result. A caller
        that is cancelled does not stop the write of its item."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        self._start_writers()
        return await done

    def _start_writers(self) -> None:
        while self._pending and len(self._writers) < self.parallel:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            writer = asyncio.create_task(self._write(batch))
            self._writers.add(writer)
            writer.add_done_callback(self._writer_done)

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        self._writers.discard(writer)
        self._start_writers()

    async def _write(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            try:
                results = list(await self._write_batch([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - handed to the callers
                if len(batch) > 1 and not self._shared(exc):
                    await asyncio.gather(*(self._write([entry]) for entry in batch))
                    return
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                return
            for (_, done), result in zip(batch, results):
                if not done.done():  # a cancelled caller
                    done.set_result(result)
        finally:
            # Never leave a caller waiting (this task cancelled, say, at shutdown).
            for _, done in batch:
                if not done.done():
                    done.set_exception(RuntimeError("the write of this item was interrupted"))
