"""Batching of query encodes (the cache in front of it is in cache.py).

Concurrent queries are encoded together by the runtime's micro-batcher
(aimesh_runtime.batching), one lane per copy of the encoder: a copy in this
process, or with `remote` one in a child process (encoder_process.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aimesh_runtime.batching import BATCH_BUCKETS, BatchMetrics, MicroBatcher
from aimesh_search.encoder import Encoded

EncodeFn = Callable[[list[str]], Encoded]
RemoteEncodeFn = Callable[[list[str]], Awaitable[Encoded]]  # a copy in another process
Embedded = tuple[np.ndarray, bool]  # a unit vector, and whether its text was truncated


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


def _per_text(encode: EncodeFn) -> Callable[[list[str]], list[Embedded]]:
    def run(texts: list[str]) -> list[Embedded]:
        return _split(encode(texts))

    return run


def _per_text_remote(encode: RemoteEncodeFn) -> Callable[[list[str]], Awaitable[list[Embedded]]]:
    async def run(texts: list[str]) -> list[Embedded]:
        return _split(await encode(texts))

    return run


def _split(encoded: Encoded) -> list[Embedded]:
    return list(zip(encoded.vectors, encoded.truncated, strict=True))


class EncoderBatcher:
    """Query encodes batched across callers; bulk encodes (upserts, imports) on
    the same lanes, so each copy of the model runs one batch at a time."""

    def __init__(
        self,
        encoders: Sequence[EncodeFn],
        *,
        remote: Sequence[RemoteEncodeFn] | None = None,
        enabled: bool,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        metrics: BatcherMetrics,
    ) -> None:
        self._batcher: MicroBatcher[str, Embedded] = MicroBatcher(
            [_per_text(encode) for encode in encoders],
            enabled=enabled,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            queue_size=queue_size,
            metrics=BatchMetrics(metrics.batch_size, metrics.queue_depth, metrics.rejected),
            busy_reason="ENCODER_BUSY",
            name="encoder",
            remote=[_per_text_remote(encode) for encode in remote] if remote else None,
        )

    @property
    def enabled(self) -> bool:
        return self._batcher.enabled

    @property
    def lanes(self) -> int:
        return self._batcher.lanes

    def start(self) -> None:
        self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()

    async def encode(self, texts: list[str]) -> Encoded:
        """Embed texts, batched with whatever else is waiting."""
        return _stacked(await self._batcher.submit(texts))

    async def encode_bulk(self, texts: list[str]) -> Encoded:
        """Embed a batch the caller already formed."""
        return _stacked(await self._batcher.run_alone(texts))


def _stacked(results: list[Embedded]) -> Encoded:
    if not results:
        return Encoded(np.zeros((0, 0), dtype=np.float32), [])
    return Encoded(np.stack([vector for vector, _ in results]), [t for _, t in results])
