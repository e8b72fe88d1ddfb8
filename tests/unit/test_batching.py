"""The runtime's micro-batcher: batches, lanes side by side, a bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aimesh_runtime.batching import BatchMetrics, MicroBatcher
from aimesh_runtime.errors import ResourceExhausted


class Lane:
    """Doubles numbers; records batch sizes, threads and how many lanes ran at once."""

    def __init__(self, running: list[int], seconds: float = 0.02) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self._running = running  # [now, most at once], shared by the lanes
        self._seconds = seconds
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self._running[0] += 1
            self._running[1] = max(self._running[1], self._running[0])
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(items))
        time.sleep(self._seconds)
        with self._lock:
            self._running[0] -= 1
        return [item * 2 for item in items]


def make(
    lanes: Sequence[Callable[[list[int]], list[int]]],
    *,
    enabled: bool = True,
    queue: int = 1000,
    max_batch: int = 64,
    max_wait_s: float = 0.02,
    remote: Sequence[Callable[[list[int]], Awaitable[Sequence[int]]]] | None = None,
) -> MicroBatcher[int, int]:
    registry = CollectorRegistry()
    return MicroBatcher(
        lanes,
        enabled=enabled,
        max_batch=max_batch,
        max_wait_s=max_wait_s,
        queue_size=queue,
        metrics=BatchMetrics(
            Histogram("batch", "", registry=registry),
            Gauge("depth", "", registry=registry),
            Counter("rejected", "", registry=registry),
        ),
        busy_reason="TEST_BUSY",
        remote=remote,
    )


async def test_concurrent_items_form_one_batch_and_answer_in_order() -> None:
    lane = Lane([0, 0])
    batcher = make([lane])
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit([n]) for n in range(32)))
    finally:
        await batcher.close()
    assert results == [[n * 2] for n in range(32)]
    assert lane.batches == [32]


async def test_items_queued_behind_a_busy_lane_go_next_without_waiting_to_fill() -> None:
    """The wait for a batch to fill counts from when an item was queued: items
    that waited behind a busy lane longer than that go as soon as it is free."""
    release = threading.Event()
    batches: list[list[int]] = []

    def lane(items: list[int]) -> list[int]:
        batches.append(items)
        release.wait(10)
        return items

    batcher = make([lane], max_batch=4, max_wait_s=2.0)
    batcher.start()
    try:
        first = asyncio.gather(*(batcher.submit([n]) for n in range(4)))  # full: runs at once
        while not batches:
            await asyncio.sleep(0.01)
        second = asyncio.gather(*(batcher.submit([n]) for n in (4, 5)))  # queued behind it
        await asyncio.sleep(2.1)  # longer than the wait to fill
        release.set()
        assert await asyncio.wait_for(first, 5) == [[0], [1], [2], [3]]
        assert await asyncio.wait_for(second, 1.0) == [[4], [5]]  # no second wait to fill
    finally:
        release.set()
        await batcher.close()
    assert batches == [[0, 1, 2, 3], [4, 5]]


async def test_two_lanes_run_batches_side_by_side_on_their_own_threads() -> None:
    running = [0, 0]
    lanes = [Lane(running), Lane(running)]
    batcher = make(lanes)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit([n, n + 1]) for n in range(200)))
    finally:
        await batcher.close()
    assert results == [[n * 2, n * 2 + 2] for n in range(200)]
    assert all(lane.batches for lane in lanes), "both lanes ran batches"
    assert running[1] == 2, "the lanes overlapped"
    assert lanes[0].threads.isdisjoint(lanes[1].threads)


async def test_batching_off_runs_each_call_alone_on_the_idlest_lane() -> None:
    running = [0, 0]
    lanes = [Lane(running), Lane(running)]
    batcher = make(lanes, enabled=False)
    try:
        await asyncio.gather(*(batcher.submit([n]) for n in range(6)))
    finally:
        await batcher.close()
    assert lanes[0].batches == [1, 1, 1] and lanes[1].batches == [1, 1, 1]


async def test_a_full_queue_refuses_with_resource_exhausted_and_retry_info() -> None:
    batcher = make([Lane([0, 0], seconds=0.3)], queue=4)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.1)  # the lane is busy with it; the queue fills behind
        with pytest.raises(ResourceExhausted) as refused:
            await batcher.submit([2, 3, 4, 5, 6])
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
        assert await first == [2]
    finally:
        await batcher.close()


async def test_a_failed_batch_fails_every_caller_in_it() -> None:
    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("model fell over")

    batcher = make([broken])
    batcher.start()
    try:
        outcomes = await asyncio.gather(
            *(batcher.submit([n]) for n in range(3)), return_exceptions=True
        )
    finally:
        await batcher.close()
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)


def test_a_batcher_needs_a_lane() -> None:
    with pytest.raises(ValueError):
        make([])


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_remote_batcher_awaits_batches_on_the_loop_not_the_lanes_thread(
    enabled: bool,
) -> None:
    lane = Lane([0, 0])
    batches: list[list[int]] = []

    async def remote(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0.01)  # the work is elsewhere; the loop waits without blocking
        return [item * 3 for item in items]

    batcher = make([lane], enabled=enabled, remote=[remote])
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit([n]) for n in range(8)))
    finally:
        await batcher.close()
    assert [r[0] for r in results] == [n * 3 for n in range(8)]
    assert lane.batches == []  # the lane's thread ran none of them
    assert len(batches) == (1 if enabled else 8)


def test_a_remote_batcher_has_one_remote_function_per_lane() -> None:
    with pytest.raises(ValueError, match="one remote function per lane"):
        make([Lane([0, 0]), Lane([0, 0])], remote=[lambda items: asyncio.sleep(0, items)])


async def test_remote_lanes_without_local_copies_run_batches_side_by_side() -> None:
    running = [0, 0]  # [now, most at once]
    calls: list[int] = []

    def lane(number: int) -> Callable[[list[int]], Awaitable[list[int]]]:
        async def remote(items: list[int]) -> list[int]:
            calls.append(number)
            running[0] += 1
            running[1] = max(running)
            await asyncio.sleep(0.05)
            running[0] -= 1
            return [item * 2 for item in items]

        return remote

    batcher = make([], remote=[lane(0), lane(1)], max_batch=4, max_wait_s=0.0)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit([n]) for n in range(16)))
        bulk = await batcher.run_alone([5, 6])
    finally:
        await batcher.close()
    assert [r[0] for r in results] == [n * 2 for n in range(16)]
    assert bulk == [10, 12]
    assert set(calls) == {0, 1} and running[1] == 2
