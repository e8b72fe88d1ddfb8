"""Scoring in a child process: same rankings as in-process, catalogue changes
followed, a dead child replaced, and no child outliving its parent."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

from aimesh_recommend import model as mf
from aimesh_recommend.scoring import ScoreRequest, ServingModel, score_batch
from aimesh_recommend.scoring_process import ScoringFailed, ScoringProcess
from tests.children import alive, child_dies_with_parent, wait_gone

CPU = torch.device("cpu")
USERS, ITEMS = 50, 400


@pytest.fixture
def serving() -> ServingModel:
    torch.manual_seed(0)
    state = mf.from_bytes(mf.to_bytes(mf.MatrixFactorization(USERS, ITEMS, 8)))
    users = [f"u{n}" for n in range(USERS)]
    items = [f"i{n}" for n in range(ITEMS)]
    rng = np.random.default_rng(0)
    seen = [(users[u], items[i]) for u in range(USERS) for i in rng.integers(0, ITEMS, 5)]
    return ServingModel("v1", state, users, items, seen, CPU)


@pytest.fixture
async def scorer() -> AsyncIterator[ScoringProcess]:
    process = ScoringProcess(torch_threads=1, timeout_s=20)
    await process.start()
    yield process
    await process.close()


def requests(model: ServingModel, rows: range) -> list[ScoreRequest]:
    return [ScoreRequest(model, r, tuple(model.seen.get(r, ()))) for r in rows]


async def test_ranks_as_in_process_and_follows_the_catalogue(
    serving: ServingModel, scorer: ScoringProcess
) -> None:
    batch = [*requests(serving, range(20)), ScoreRequest(serving, 3, ())]  # seen kept once
    expected = score_batch(batch)
    got = await scorer.score_batch(batch)
    assert [r.rows for r in got] == [r.rows for r in expected]
    assert np.allclose([r.scores for r in got], [r.scores for r in expected])
    assert not set(got[3].rows) & set(serving.seen[3])
    top = got[0].rows[0]
    serving.set_active(serving.item_ids[top], False)  # deleted from the catalogue
    assert all(top not in r.rows for r in await scorer.score_batch(batch))
    serving.set_catalogue({serving.item_ids[top]})
    unmasked = [ScoreRequest(serving, 0, ()), ScoreRequest(serving, 1, ())]
    assert [r.rows for r in await scorer.score_batch(unmasked)] == [[top], [top]]


async def test_a_dead_or_stuck_child_is_replaced(
    serving: ServingModel, scorer: ScoringProcess
) -> None:
    batch = requests(serving, range(4))
    first = [r.rows for r in await scorer.score_batch(batch)]
    killed = scorer.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    assert await wait_gone(killed)
    try:
        again = await scorer.score_batch(batch)
    except ScoringFailed as error:  # caught still exiting: this batch fails, the next is served
        assert "exited" in str(error)
        again = await scorer.score_batch(batch)
    assert [r.rows for r in again] == first  # by a new child
    stuck = scorer.pid
    assert stuck not in (None, killed)
    os.kill(stuck, signal.SIGSTOP)
    scorer.timeout_s = 0.5
    with pytest.raises(ScoringFailed, match="no answer"):
        await scorer.score_batch(batch)
    assert await wait_gone(stuck)
    scorer.timeout_s = 20
    assert [r.rows for r in await scorer.score_batch(batch)] == first
    assert scorer.pid not in (None, killed, stuck)


async def test_close_stops_the_child_and_later_batches_fail(serving: ServingModel) -> None:
    scorer = ScoringProcess(torch_threads=1)
    await scorer.score_batch(requests(serving, range(2)))
    pid = scorer.pid
    assert pid is not None and alive(pid)
    await scorer.close()
    assert not alive(pid)
    with pytest.raises(ScoringFailed):
        await scorer.score_batch(requests(serving, range(2)))


PARENT = """
import asyncio
from aimesh_recommend.scoring_process import ScoringProcess

async def main():
    scorer = ScoringProcess(torch_threads=1)
    await scorer.start()
    print(scorer.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_the_child_exits_when_its_parent_dies(how: signal.Signals) -> None:
    assert await child_dies_with_parent(PARENT, how), "the scoring process outlived its parent"


async def test_a_caller_cancelled_mid_batch_leaves_the_next_its_own_answer(
    scorer: ScoringProcess,
) -> None:
    # Batching off runs each call in its caller's task, which a deadline can cancel.
    torch.manual_seed(1)
    state = mf.from_bytes(mf.to_bytes(mf.MatrixFactorization(64, 200_000, 8)))
    model = ServingModel(
        "v1", state, [f"u{n}" for n in range(64)], [f"i{n}" for n in range(200_000)], [], CPU
    )
    first, second = requests(model, range(32)), requests(model, range(32, 64))
    await scorer.score_batch(first[:1])  # the model is in the child
    for _ in range(5):
        call = asyncio.create_task(scorer.score_batch(first))
        await asyncio.sleep(0.002)  # the batch is in the child
        call.cancel()
        got = await scorer.score_batch(second)
        assert [r.rows for r in got] == [r.rows for r in score_batch(second)]
