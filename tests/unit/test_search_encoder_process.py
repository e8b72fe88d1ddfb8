"""Search's encoder copies in child processes: the same vectors and truncated
flags as in-process copies, a child that dies mid-batch fails that batch with
UNAVAILABLE and is replaced for the next, and no child outlives its parent."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from aimesh_search.batcher import BatcherMetrics, EncoderBatcher
from aimesh_search.encoder import Encoder
from aimesh_search.encoder_process import EncoderFailed, EncoderProcess
from tests.children import alive, child_dies_with_parent, wait_gone

NAME = "all-MiniLM-L6-v2"
TEXTS = ["a cat on a mat", "stock markets fell", "word " * 400, "", "graph neural networks"]


@pytest.fixture(scope="module")
def in_process() -> Encoder:
    return Encoder("", NAME, "cpu")


@pytest.fixture
async def child() -> AsyncIterator[EncoderProcess]:
    process = EncoderProcess("", NAME, torch_threads=1, timeout_s=60)
    await process.describe()
    yield process
    await process.close()


async def test_encodes_as_in_process_through_the_batcher(
    in_process: Encoder, child: EncoderProcess
) -> None:
    info = await child.describe()  # already running: answers from the same child
    assert info == in_process.info
    expected = in_process.encode(TEXTS)
    got = await child.encode(TEXTS)
    assert got.truncated == expected.truncated == [False, False, True, False, False]
    assert np.allclose(got.vectors, expected.vectors, atol=1e-5)
    batcher = EncoderBatcher(
        [],
        remote=[child.encode],
        enabled=True,
        max_batch=64,
        max_wait_s=0.005,
        queue_size=64,
        metrics=BatcherMetrics(CollectorRegistry()),
    )
    batcher.start()
    try:
        one_by_one = await asyncio.gather(*(batcher.encode([text]) for text in TEXTS))
        bulk = await batcher.encode_bulk(TEXTS)
    finally:
        await batcher.close()
    assert [e.truncated[0] for e in one_by_one] == expected.truncated == bulk.truncated
    assert np.allclose(np.stack([e.vectors[0] for e in one_by_one]), expected.vectors, atol=1e-5)
    assert np.allclose(bulk.vectors, expected.vectors, atol=1e-5)


async def test_a_child_killed_mid_batch_or_stuck_fails_that_batch_and_the_next_restarts_it(
    child: EncoderProcess,
) -> None:
    first = await child.encode(TEXTS[:2])
    killed = child.pid
    assert killed is not None
    # Long enough a batch to be still running when the child is killed.
    batch = asyncio.create_task(child.encode([f"{n} " + "long text " * 60 for n in range(512)]))
    await asyncio.sleep(0.5)
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(EncoderFailed, match="exited") as failed:
        await batch
    status = failed.value.to_status()
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert failed.value.reason == "ENCODER_FAILED"
    assert await wait_gone(killed)
    again = await child.encode(TEXTS[:2])  # by a new child
    stuck = child.pid
    assert stuck not in (None, killed)
    assert np.allclose(again.vectors, first.vectors, atol=1e-6)
    os.kill(stuck, signal.SIGSTOP)  # a wedged child is killed and replaced too
    child.timeout_s = 0.5
    with pytest.raises(EncoderFailed, match="no answer"):
        await child.encode(TEXTS[:2])
    assert await wait_gone(stuck)
    child.timeout_s = 60
    assert np.allclose((await child.encode(TEXTS[:2])).vectors, first.vectors, atol=1e-6)
    assert child.pid not in (None, killed, stuck)


async def test_close_stops_the_child_and_later_batches_fail(child: EncoderProcess) -> None:
    pid = child.pid
    assert pid is not None and alive(pid)
    await child.close()
    assert await wait_gone(pid)
    with pytest.raises(EncoderFailed, match="stopped"):
        await child.encode(TEXTS[:1])


PARENT = """
import asyncio
from aimesh_search.encoder_process import EncoderProcess

async def main():
    encoder = EncoderProcess("", "all-MiniLM-L6-v2", torch_threads=1)
    await encoder.describe()
    print(encoder.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_the_child_exits_when_its_parent_dies(how: signal.Signals) -> None:
    assert await child_dies_with_parent(PARENT, how), "the encoder process outlived its parent"
