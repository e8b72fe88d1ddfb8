"""Dynamic micro-batching of encodes, and an LRU cache of query embeddings.

Concurrent callers put texts on a bounded queue; one worker takes up to
`max_batch` of them, waiting at most `max_wait_s` for a batch to fill, and
encodes them together on a single worker thread, so the event loop never
blocks and the model sees one batch at a time. A full queue refuses at once
with RESOURCE_EXHAUSTED instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aimesh_runtime.errors import ResourceExhausted
from aimesh_search.encoder import Encoded

EncodeFn = Callable[[list[str]], Encoded]
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class BatcherMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.batch_size = Histogram(
            "aimesh_search_encoder_batch_size", "Texts per encoder batch.",
            buckets=BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "aimesh_search_encoder_queue_depth", "Texts waiting to be encoded.", registry=registry
        )
        self.cache = Counter(
            "aimesh_search_query_cache", "Query embedding cache lookups.", ("result",),
            registry=registry,
        )  # fmt: skip
        self.hit_ratio = Gauge(
            "aimesh_search_query_cache_hit_ratio",
            "Share of query embeddings served from the cache since start.",
            registry=registry,
        )
        self.rejected = Counter(
            "aimesh_search_encoder_rejected", "Texts refused because the queue was full.",
            registry=registry,
        )  # fmt: skip


class QueryCache:
    """Least-recently-used query embeddings, keyed by model and text."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, str], tuple[np.ndarray, bool]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, model: str, text: str) -> tuple[np.ndarray, bool] | None:
        entry = self._entries.get((model, text))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end((model, text))
        self.hits += 1
        return entry

    def put(self, model: str, text: str, vector: np.ndarray, truncated: bool) -> None:
        if self._size == 0:
            return
        self._entries[(model, text)] = (vector, truncated)
        self._entries.move_to_end((model, text))
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class MicroBatcher:
    def __init__(
        self,
        encode: EncodeFn,
        *,
        enabled: bool,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        metrics: BatcherMetrics,
    ) -> None:
        self._encode = encode
        self.enabled = enabled
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[tuple[np.ndarray, bool]]]] = (
            asyncio.Queue(maxsize=queue_size)
        )
        self._metrics = metrics
        # One thread: the model runs one batch at a time, with torch's own threads inside.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._worker: asyncio.Task[None] | None = None
        self._seconds_per_text = 0.005  # refined as batches run; used for RetryInfo

    def start(self) -> None:
        if self.enabled and self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="encoder-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(self, texts: list[str]) -> Encoded:
        """Embed texts, batched with whatever else is waiting."""
        if not texts:
            return Encoded(np.zeros((0, 0), dtype=np.float32), [])
        if not self.enabled:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._encode, texts)
        if self._queue.maxsize - self._queue.qsize() < len(texts):
            self._metrics.rejected.inc(len(texts))
            wait = max(self._queue.qsize() * self._seconds_per_text, 0.05)
            raise ResourceExhausted(
                "encoder queue is full; retry later", retry_after_s=wait, reason="ENCODER_BUSY"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:
            future: asyncio.Future[tuple[np.ndarray, bool]] = loop.create_future()
            self._queue.put_nowait((text, future))
            futures.append(future)
        self._metrics.queue_depth.set(self._queue.qsize())
        results = await asyncio.gather(*futures)
        return Encoded(
            np.stack([vector for vector, _ in results]), [truncated for _, truncated in results]
        )

    async def encode_bulk(self, texts: list[str]) -> Encoded:
        """Embed a batch the caller already formed (upserts, imports), on the same
        thread as queries so the model runs one batch at a time."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait_s
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
            live = [(text, future) for text, future in batch if not future.done()]
            self._metrics.queue_depth.set(self._queue.qsize())
            if not live:
                continue
            self._metrics.batch_size.observe(len(live))
            started = time.perf_counter()
            try:
                encoded = await loop.run_in_executor(
                    self._executor, self._encode, [text for text, _ in live]
                )
            except Exception as error:  # every waiter learns of the failure
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            self._seconds_per_text = (time.perf_counter() - started) / len(live)
            for index, (_, future) in enumerate(live):
                if not future.done():
                    future.set_result((encoded.vectors[index], encoded.truncated[index]))
