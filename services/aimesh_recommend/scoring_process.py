"""Scoring in a child process, so its Python never waits on the event loop's GIL.

In one process the event loop and the scoring thread share one interpreter
lock: each torch call the scorer makes hands the lock back and waits for it
again behind the loop's gRPC work. Here the event loop writes each batch (user
rows, seen items) to a child process and awaits the answer on the pipe, with
no thread of its own; the child holds the model's tensors and runs the same
`top_items` as in-process scoring.

Protocol: length-prefixed pickles on a pipe pair private to this process and
its own child (the child's stdin and a copy of its stdout). In: the weights of
a model once ("model"), its biases again after a catalogue change ("bias"),
and batches ("score"), each answered by ("ok", scores, item rows) or
("error", text). The child ignores SIGINT and SIGTERM and exits at end of
input: when the parent closes the pipe, or dies (even by SIGKILL); a watcher
thread also exits it when it is re-parented. A child that dies or stops
answering fails its batch (the model breaker and the fallback take it) and is
started again for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from aimesh_recommend.scoring import (
    MAX_K,
    Ranked,
    ScoreRequest,
    ServingModel,
    ranked_lists,
)

log = logging.getLogger(__name__)
HEADER = struct.Struct("<Q")
MODELS_KEPT = 4  # versions the child holds: the served one and any batch still on an old one


class ScoringFailed(RuntimeError):
    """The scoring process failed or stopped answering; the next batch restarts it."""


def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _write(fd: int, message: tuple[Any, ...]) -> None:
    view = memoryview(_frame(message))
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    """`size` bytes, or None at end of input."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read(fd: int) -> tuple[Any, ...] | None:
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    data = _read_exact(fd, HEADER.unpack(header)[0])
    if data is None:
        return None
    message: tuple[Any, ...] = pickle.loads(data)
    return message


class ScoringProcess:
    """The parent side, on the event loop: `score_batch` is the batcher's
    remote lane (one batch at a time; the loop waits on the pipe, no thread)."""

    def __init__(self, torch_threads: int, timeout_s: float = 30.0) -> None:
        self._torch_threads = torch_threads
        self.timeout_s = timeout_s  # longest wait for one batch's answer
        self._turn = asyncio.Lock()  # one batch in the pipe at a time
        self._child: asyncio.subprocess.Process | None = None
        self._closed = False
        # Per model: its key in the child and the bias version the child holds.
        self._sent: weakref.WeakKeyDictionary[ServingModel, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._keys = itertools.count(1)

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    async def start(self) -> None:
        """Start the child now, so it loads torch before the first batch."""
        async with self._turn:
            await self._running()

    async def _running(self) -> asyncio.subprocess.Process:
        if self._closed:
            raise ScoringFailed("the scoring process is stopped")
        child = self._child
        if child is not None and child.returncode is None:
            return child
        if child is not None:
            log.warning(
                "scoring process %d exited (%s); starting another", child.pid, child.returncode
            )
            await self._discard(child)
        self._child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aimesh_recommend.scoring_process",
            str(self._torch_threads),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._sent = weakref.WeakKeyDictionary()
        return self._child

    async def _discard(self, child: asyncio.subprocess.Process) -> None:
        """Kill and reap `child` (it may be wedged or half way through a message)."""
        if self._child is child:
            self._child = None
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        await child.wait()
        if child.stdin is not None:
            child.stdin.close()

    async def close(self, timeout_s: float = 5.0) -> None:
        """End of input for the child, which exits after the batch it is on."""
        self._closed = True
        child = self._child
        if child is None:
            return
        if child.stdin is not None:
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), timeout_s)
        except TimeoutError:
            log.warning("scoring process %d did not stop; killing it", child.pid)
        await self._discard(child)

    async def score_batch(self, requests: Sequence[ScoreRequest]) -> list[Ranked]:
        """Rankings in order, one round trip per model the requests name. A
        caller cancelled meanwhile (batching off: a deadline) leaves the round
        trip to finish, so the next batch never reads this one's answer."""
        task = asyncio.ensure_future(self._score_all(requests))
        task.add_done_callback(_retrieved)
        return await asyncio.shield(task)

    async def _score_all(self, requests: Sequence[ScoreRequest]) -> list[Ranked]:
        results: list[Ranked] = [Ranked([], [])] * len(requests)
        groups: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(id(request.model), []).append(position)
        async with self._turn:
            for positions in groups.values():
                group = [requests[p] for p in positions]
                for position, ranked in zip(
                    positions, await self._score(group[0].model, group), strict=True
                ):
                    results[position] = ranked
        return results

    async def _score(self, model: ServingModel, requests: list[ScoreRequest]) -> list[Ranked]:
        child = await self._running()
        assert child.stdin is not None and child.stdout is not None
        rows = np.fromiter((r.user_row for r in requests), np.int64, len(requests))
        counts = np.fromiter((len(r.exclude) for r in requests), np.int64, len(requests))
        columns = np.fromiter(itertools.chain.from_iterable(r.exclude for r in requests), np.int64)
        positions = np.repeat(np.arange(len(requests), dtype=np.int64), counts)
        reply: tuple[Any, ...] | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                key = self._publish(child.stdin, model)
                child.stdin.write(_frame(("score", key, rows, positions, columns, MAX_K)))
                await child.stdin.drain()
                header = await child.stdout.readexactly(HEADER.size)
                reply = pickle.loads(await child.stdout.readexactly(HEADER.unpack(header)[0]))
            problem = ""
        except TimeoutError:
            problem = f"gave no answer in {self.timeout_s:g} s"
        except asyncio.IncompleteReadError:
            problem = "exited"
        except (OSError, ValueError, pickle.UnpicklingError) as error:
            problem = f"failed: {error!r}"
        except BaseException:  # the pipe's state is unknown: start afresh
            await self._discard(child)
            raise
        if reply is None or reply[0] != "ok":  # start afresh: the next batch resends the model
            await self._discard(child)
            raise ScoringFailed(f"scoring process {child.pid} {problem or (reply and reply[1])}")
        return ranked_lists(reply[1], reply[2])

    def _publish(self, stdin: asyncio.StreamWriter, model: ServingModel) -> int:
        """The model's key in the child, sending its weights, or its biases
        after a catalogue change, when the child lacks them."""
        version = model.bias_version
        sent = self._sent.get(model)
        if sent is None:
            key = next(self._keys)
            stdin.write(
                _frame(
                    (
                        "model",
                        key,
                        model.users.cpu().numpy(),
                        model.items.cpu().numpy(),
                        model.scoring_bias.cpu().numpy(),
                    )
                )
            )
        else:
            key = sent[0]
            if sent[1] != version:
                stdin.write(_frame(("bias", key, model.scoring_bias.cpu().numpy())))
        self._sent[model] = (key, version)
        return key


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks a failure seen when the caller that awaited it was cancelled."""
    if not task.cancelled():
        task.exception()


def _watch_parent(parent: int) -> None:
    """Exit when re-parented: the parent died while something else holds the pipe open."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(torch_threads: int) -> None:
    """The child's loop; returns at end of input."""
    import torch

    from aimesh_recommend.scoring import top_items

    if torch_threads:
        torch.set_num_threads(torch_threads)
    # The protocol gets its own copy of stdout; stray prints go to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    models: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    while True:
        message = _read(0)
        if message is None:
            return
        kind, key = message[0], message[1]
        try:
            if kind == "model":
                users, items, bias = (torch.from_numpy(np.array(a)) for a in message[2:5])
                models[key] = (users, items, bias)
                while len(models) > MODELS_KEPT:
                    del models[next(iter(models))]
            elif kind == "bias":
                users, items, _ = models[key]
                models[key] = (users, items, torch.from_numpy(np.array(message[2])))
            elif kind == "score":
                rows, positions, columns, k = message[2:6]
                if key not in models:
                    raise KeyError(f"model {key} is not loaded")
                users, items, bias = models[key]
                excluded = (
                    torch.from_numpy(np.stack([positions, columns], axis=1))
                    if len(columns)
                    else None
                )
                values, indices = top_items(users, items, bias, torch.from_numpy(rows), excluded, k)
                _write(out, ("ok", values.numpy(), indices.numpy()))
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception as error:  # the parent's batch fails; the child goes on
            if kind == "score":
                _write(out, ("error", repr(error)))
            else:
                print(f"scoring process: {kind} failed: {error!r}", file=sys.stderr)


def main() -> None:
    # The parent decides when this stops (end of input); a terminal's Ctrl-C
    # or a process group's SIGTERM reaches the parent, which drains first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with contextlib.suppress(BrokenPipeError):  # the parent went away mid-answer
        serve(int(sys.argv[1]) if len(sys.argv) > 1 else 1)


if __name__ == "__main__":
    main()
