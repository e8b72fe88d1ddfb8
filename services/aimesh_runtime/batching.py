"""Dynamic micro-batching, shared by the services that run a model.

Callers submit items to a bounded queue. A worker per lane takes up to
`max_batch` of them, waiting for the batch to fill until `max_wait_s` after
the oldest was queued (a backlog goes at once), and runs the whole batch on
that lane's own thread, so the event loop never blocks and each lane runs one
batch at a time. A lane is one copy of the model: on a CPU, copies with one
torch thread each beat one copy using every core, because torch's threads wait
for each other at every layer while the event loop, the database and the
clients keep taking cores from them. A full queue refuses at once with
RESOURCE_EXHAUSTED (with RetryInfo) rather than letting latency grow without
bound. Switched off, each call runs alone on the least busy lane: the baseline
the benchmarks compare against. With `remote` (one coroutine function per
lane), a lane's batches are not run on its thread but awaited on the event loop
from its remote function (its copy of the model runs in another process); the
lane's thread then runs only `on_lane` work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from aimesh_runtime.errors import ResourceExhausted

Item = TypeVar("Item")
Result = TypeVar("Result")
T = TypeVar("T")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class BatchMetrics:
    batch_size: Histogram
    queue_depth: Gauge
    rejected: Counter


Remote = Callable[[list[Item]], Awaitable[Sequence[Result]]]


@dataclass
class _Lane(Generic[Item, Result]):
    run: Callable[[list[Item]], Sequence[Result]] | None
    remote: Remote[Item, Result] | None
    executor: ThreadPoolExecutor
    busy: int = 0  # batches queued or running on this lane


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        lanes: Sequence[Callable[[list[Item]], Sequence[Result]]],
        *,
        enabled: bool,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        metrics: BatchMetrics,
        busy_reason: str,
        name: str = "batcher",
        remote: Sequence[Remote[Item, Result]] | None = None,
    ) -> None:
        """`lanes`: one function per model copy, taking a batch of items and
        returning one result per item, in order. Blocking; run on the lane's thread.
        `remote`: per lane, the coroutine function that runs its batches instead;
        with it, `lanes` may be empty (no in-process copy) or name one per remote."""
        if remote is not None and lanes and len(lanes) != len(remote):
            raise ValueError("a remote batcher has one remote function per lane")
        runs: Sequence[Callable[[list[Item]], Sequence[Result]] | None] = lanes
        if remote is not None and not lanes:
            runs = [None] * len(remote)
        if not runs:
            raise ValueError("a batcher needs at least one lane")
        self.enabled = enabled
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        # Each entry: the item, its caller's future, and when it was queued.
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result], float]] = asyncio.Queue(
            maxsize=queue_size
        )
        self._metrics = metrics
        self._busy_reason = busy_reason
        self._name = name
        self._lanes = [
            _Lane(
                run,
                remote[n] if remote is not None else None,
                ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}{n}"),
            )
            for n, run in enumerate(runs)
        ]
        self._workers: list[asyncio.Task[None]] = []
        self._seconds_per_item = 0.005  # refined as batches run; used for RetryInfo

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def start(self) -> None:
        if self.enabled and not self._workers:
            self._workers = [
                asyncio.create_task(self._work(lane), name=f"{self._name}-{n}")
                for n, lane in enumerate(self._lanes)
            ]

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        for lane in self._lanes:
            lane.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """Results for `items`, batched with whatever else is waiting."""
        if not items:
            return []
        if not self.enabled:
            return await self.run_alone(list(items))
        if self._queue.maxsize - self._queue.qsize() < len(items):
            self._metrics.rejected.inc(len(items))
            wait = max(self._queue.qsize() * self._seconds_per_item, 0.05)
            raise ResourceExhausted(
                f"{self._name} queue is full; retry later",
                retry_after_s=wait,
                reason=self._busy_reason,
            )
        loop = asyncio.get_running_loop()
        futures = []
        queued_at = loop.time()
        for item in items:
            future: asyncio.Future[Result] = loop.create_future()
            self._queue.put_nowait((item, future, queued_at))
            futures.append(future)
        self._metrics.queue_depth.set(self._queue.qsize())
        if len(futures) == 1:  # the common call: no gathering future to build
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def run_alone(self, items: list[Item]) -> list[Result]:
        """Run a batch the caller formed itself on the least busy lane, so each
        model copy still runs one batch at a time."""
        lane = min(self._lanes, key=lambda candidate: candidate.busy)
        if lane.remote is not None:
            lane.busy += 1
            try:
                return list(await lane.remote(items))
            finally:
                lane.busy -= 1
        assert lane.run is not None
        return list(await self.on_lane(lane.run, items, lane=lane))

    async def on_lane(
        self, function: Callable[..., T], *args: Any, lane: _Lane[Item, Result] | None = None
    ) -> T:
        """Run other work of the model's (a lookup, a bulk encode) on a lane's
        thread, between its batches."""
        chosen = lane or min(self._lanes, key=lambda candidate: candidate.busy)
        chosen.busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                chosen.executor, function, *args
            )
        finally:
            chosen.busy -= 1

    async def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result], float]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        # The wait to fill counts from when the oldest item was queued: items
        # that queued behind a busy lane have waited already, and go at once.
        deadline = batch[0][2] + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _work(self, lane: _Lane[Item, Result]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [(item, future) for item, future, _ in batch if not future.done()]
            self._metrics.queue_depth.set(self._queue.qsize())
            if not live:
                continue
            self._metrics.batch_size.observe(len(live))
            started = time.perf_counter()
            lane.busy += 1
            items = [item for item, _ in live]
            try:
                if lane.remote is not None:
                    results = await lane.remote(items)
                else:
                    assert lane.run is not None
                    results = await loop.run_in_executor(lane.executor, lane.run, items)
            except Exception as error:  # every waiter learns of the failure
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                lane.busy -= 1
            self._seconds_per_item = (time.perf_counter() - started) / len(live) / self.lanes
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
