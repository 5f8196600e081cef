"""Micro-batching: requests that arrive close together are answered by one `Engine.run_batch`.

One collector task takes the first waiting request at once. When the previous batch held more than one
request (the server is under load) it waits up to `window_s` for more, up to `max_batch`; when the server is
idle a lone request never waits. Batches run one at a time on a single worker thread (torch and the intent
cache are used by one thread), so the event loop keeps accepting and parsing requests meanwhile, and those
form the next batch. Each queued request carries the engine it was admitted on: after a reload, requests
already admitted finish on the old engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class MicroBatcher:
    def __init__(self, window_s: float, max_batch: int, threads: int = 1,
                 on_batch: Callable[[int, float], None] | None = None):
        self.window_s = max(0.0, window_s)
        self.max_batch = max(1, max_batch)
        self.threads = threads
        self.on_batch = on_batch or (lambda n, s: None)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="recpipe-batch")
        self._last_size = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="recpipe-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, engine: Any, query: Any) -> Any:
        """The engine's answer to one query (an Answer or a RequestError), batched with its neighbours."""
        assert self._queue is not None, "the batcher is not started"
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((engine, query, fut))
        return await fut

    async def _collect(self) -> None:
        q = self._queue
        while True:
            batch = [await q.get()]
            self._drain(batch)
            if self._last_size > 1 and self.window_s > 0 and len(batch) < self.max_batch:
                deadline = time.perf_counter() + self.window_s
                while len(batch) < self.max_batch:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(q.get(), left))
                    except TimeoutError:
                        break
                    self._drain(batch)
            live = [b for b in batch if not b[2].done()]  # a client that went away: nothing to compute
            self._last_size = len(live)
            if live:
                await self._run(live)

    def _drain(self, batch: list) -> None:
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _run(self, batch: list) -> None:
        loop = asyncio.get_running_loop()
        by_engine: dict[int, list] = {}
        for item in batch:
            by_engine.setdefault(id(item[0]), []).append(item)
        for items in by_engine.values():
            engine = items[0][0]
            t0 = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self._pool, engine.run_batch, [it[1] for it in items],
                                                     self.threads)
            except Exception as e:  # a bug, not bad input: every request of the batch gets it, the loop goes on
                answers = [e] * len(items)
            self.on_batch(len(items), time.perf_counter() - t0)
            for (_, _, fut), ans in zip(items, answers):
                if not fut.done():
                    fut.set_result(ans)
