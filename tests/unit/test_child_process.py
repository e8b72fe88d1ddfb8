"""aimesh_runtime.child_process: a child that cannot start is not restarted for every request."""

from __future__ import annotations

import asyncio
import time

import pytest

from aimesh_runtime import child_process
from aimesh_runtime.child_process import ChildFailed, ChildProcess


async def test_a_child_failing_in_a_row_is_restarted_after_a_growing_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(child_process, "FIRST_BACKOFF_S", 0.3)
    # A module that does not exist: every child exits at once.
    child = ChildProcess("aimesh_no_such_module", name="broken", timeout_s=10)
    starts = 0
    real_running = child._running

    async def counted() -> asyncio.subprocess.Process:
        nonlocal starts
        before = child._child
        process = await real_running()
        starts += process is not before
        return process

    monkeypatch.setattr(child, "_running", counted)
    try:
        for _ in range(2):  # the first failure restarts at once
            with pytest.raises(ChildFailed, match="broken process"):
                await child.ask(lambda: [("ping",)])
        assert starts == 2
        started = time.monotonic()
        with pytest.raises(ChildFailed, match=r"failed 2 times in a row; the next starts in"):
            await child.ask(lambda: [("ping",)])
        assert starts == 2 and time.monotonic() - started < 0.2  # refused, not started
        await asyncio.sleep(0.35)
        with pytest.raises(ChildFailed, match="broken process"):
            await child.ask(lambda: [("ping",)])
        assert starts == 3
        doubled = r"failed 3 times in a row; the next starts in 0\.[4-6]"
        with pytest.raises(ChildFailed, match=doubled):
            await child.ask(lambda: [("ping",)])
    finally:
        await child.close()
