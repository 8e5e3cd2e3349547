"""Dynamic batching for a model served to concurrent requests: what arrives together runs together.

Requests put their items (one per image) into a queue from the event loop; one collector task
takes the first waiting item, then whatever else arrives within ``max_wait`` of that item's
arrival (up to ``max_batch`` items), and runs the model on the lot in one worker thread, so the
event loop keeps accepting and decoding requests meanwhile. Items that queue up while a batch
runs have already waited, so the next batch starts as soon as the model is free.

No web code here: the server (``finetune.commands.serving``) awaits ``Batcher.submit``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Item(Generic[In]):
    value: In
    future: asyncio.Future
    arrived: float = field(default=0.0)


class Batcher(Generic[In, Out]):
    """Collects items submitted from concurrent coroutines into batches for one model.

    Args:
        run: the model on a batch: a list of items in, one result per item out, in order. It runs
            in a worker thread of its own (one at a time), never on the event loop.
        max_batch: the most items in one batch.
        max_wait: seconds a batch may wait, from its first item's arrival, for more items.
    """

    def __init__(self, run: Callable[[list[In]], Sequence[Out]], max_batch: int = 32, max_wait: float = 0.005):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.batches = 0  # batches run so far, the items in them and the seconds they took: what /info reports
        self.items = 0
        self.busy_seconds = 0.0
        self._queue: asyncio.Queue[_Item[In]] | None = None
        self._task: asyncio.Task | None = None
        self._worker: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the collector on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task = asyncio.create_task(self._collect(), name="batcher")

    async def stop(self) -> None:
        """Stop collecting (requests still waiting get a RuntimeError) and end the worker thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the server is shutting down"))
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    async def submit(self, values: Sequence[In]) -> list[Out]:
        """Results for ``values``, in order, once the batches holding them have run.

        A caller that is cancelled (its client gone) leaves its items behind as cancelled
        futures: the collector drops them rather than running the model for nobody.
        """
        if self._queue is None or self._task is None:
            raise RuntimeError("the batcher is not running: call start() first")
        loop = asyncio.get_running_loop()
        items = [_Item(value, loop.create_future(), loop.time()) for value in values]
        for item in items:
            self._queue.put_nowait(item)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
            raise

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = batch[0].arrived + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    break
            batch = [item for item in batch if not item.future.done()]  # cancelled: nobody waits
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Item[In]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results: Any = await loop.run_in_executor(self._worker, self.run, [item.value for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the model gave {len(results)} results for a batch of {len(batch)}")
        except (Exception, asyncio.CancelledError) as err:  # the model failed, or stop(): every request hears it
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err if isinstance(err, Exception) else
                                              RuntimeError("the server is shutting down"))
            if isinstance(err, asyncio.CancelledError):
                raise
            return
        self.batches += 1
        self.items += len(batch)
        self.busy_seconds += time.perf_counter() - started
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
