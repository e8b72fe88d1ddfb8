"""A model's work in a child process, so its Python never waits on the event loop's GIL.

In one process the event loop and a model's thread share one interpreter lock:
each torch call the model makes hands the lock back and waits for it again
behind the loop's gRPC work. Here the event loop writes each request to a child
process and awaits the answer on the pipe, with no thread of its own.

Protocol: length-prefixed pickles on a pipe pair private to this process and
its own child (the child's stdin and a copy of its stdout). Each message is a
tuple whose first field names it; a request is answered by ("ok", ...) or
("error", text), a one-way message (state the child keeps) by nothing. The
child ignores SIGINT and SIGTERM and exits at end of input: when the parent
closes the pipe, or dies (even by SIGKILL); a watcher thread also exits it when
it is re-parented. A child that dies or stops answering fails its request
(ChildFailed) and is started again for the next; after two or more failures in
a row, requests fail at once until a back-off has passed (0.5 s, doubling to
30 s), so a child that cannot start (its model too big for the memory left,
say) is not reloaded for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

log = logging.getLogger(__name__)
HEADER = struct.Struct("<Q")
Message = tuple[Any, ...]
FIRST_BACKOFF_S, MOST_BACKOFF_S = 0.5, 30.0


class ChildFailed(RuntimeError):
    """The child process failed or stopped answering; the next request restarts it."""


def frame(message: Message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class ChildProcess:
    """The parent side, on the event loop: one request in the pipe at a time."""

    def __init__(
        self,
        module: str,
        *args: str,
        name: str,
        timeout_s: float = 30.0,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        """Runs `python -m module args`; `on_start` is called whenever a new child
        starts, so the caller forgets what the last one held."""
        self._command = (sys.executable, "-m", module, *args)
        self.name = name
        self.timeout_s = timeout_s  # longest wait for one answer
        self._on_start = on_start
        self._turn = asyncio.Lock()
        self._child: asyncio.subprocess.Process | None = None
        self._closed = False
        self._failures = 0  # requests failed in a row
        self._next_start_at = 0.0  # monotonic time before which no child is started

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    async def start(self) -> None:
        """Start the child now, so it loads its model before the first request."""
        async with self._turn:
            await self._running()

    async def _running(self) -> asyncio.subprocess.Process:
        if self._closed:
            raise ChildFailed(f"the {self.name} process is stopped")
        child = self._child
        if child is not None and child.returncode is None:
            return child
        wait_s = self._next_start_at - time.monotonic()
        if wait_s > 0:
            raise ChildFailed(
                f"the {self.name} process failed {self._failures} times in a row;"
                f" the next starts in {wait_s:.1f} s"
            )
        if child is not None:
            log.warning(
                "%s process %d exited (%s); starting another",
                self.name,
                child.pid,
                child.returncode,
            )
            await self._discard(child)
        self._child = await asyncio.create_subprocess_exec(
            *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        if self._on_start is not None:
            self._on_start()
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
        """End of input for the child, which exits after the request it is on."""
        self._closed = True
        child = self._child
        if child is None:
            return
        if child.stdin is not None:
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s process %d did not stop; killing it", self.name, child.pid)
        await self._discard(child)

    async def ask(
        self, messages: Callable[[], Sequence[Message]], timeout_s: float | None = None
    ) -> Message:
        """Send what `messages()` returns, the last a request, and return the
        ("ok", ...) answer within `timeout_s` (default: the process's). `messages`
        runs once the child is up, so it can send state this child lacks. A
        caller cancelled meanwhile leaves the round trip to finish, so the next
        request never reads this one's answer."""
        task = asyncio.ensure_future(self._ask(messages, timeout_s or self.timeout_s))
        task.add_done_callback(_retrieved)
        return await asyncio.shield(task)

    async def _ask(self, messages: Callable[[], Sequence[Message]], timeout_s: float) -> Message:
        async with self._turn:
            child = await self._running()
            assert child.stdin is not None and child.stdout is not None
            reply: Message | None = None
            try:
                async with asyncio.timeout(timeout_s):
                    for message in messages():
                        child.stdin.write(frame(message))
                    await child.stdin.drain()
                    header = await child.stdout.readexactly(HEADER.size)
                    reply = pickle.loads(await child.stdout.readexactly(HEADER.unpack(header)[0]))
                problem = ""
            except TimeoutError:
                problem = f"gave no answer in {timeout_s:g} s"
            except asyncio.IncompleteReadError:
                problem = "exited"
            except (OSError, ValueError, pickle.UnpicklingError) as error:
                problem = f"failed: {error!r}"
            except BaseException:  # the pipe's state is unknown: start afresh
                await self._discard(child)
                raise
            if reply is None or reply[0] != "ok":  # start afresh, with nothing held
                await self._discard(child)
                self._failed()
                detail = problem or (reply[1] if reply else "")
                raise ChildFailed(f"{self.name} process {child.pid} {detail}")
            self._failures = 0
            return reply

    def _failed(self) -> None:
        """One more failure in a row: the first restarts at once, later ones wait."""
        self._failures += 1
        if self._failures >= 2:
            backoff = min(FIRST_BACKOFF_S * 2 ** (self._failures - 2), MOST_BACKOFF_S)
            self._next_start_at = time.monotonic() + backoff


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks a failure seen when the caller that awaited it was cancelled."""
    if not task.cancelled():
        task.exception()


# --- the child's side ------------------------------------------------------------


def _write(fd: int, message: Message) -> None:
    view = memoryview(frame(message))
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


def _read(fd: int) -> Message | None:
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    data = _read_exact(fd, HEADER.unpack(header)[0])
    if data is None:
        return None
    message: Message = pickle.loads(data)
    return message


def _watch_parent(parent: int) -> None:
    """Exit when re-parented: the parent died while something else holds the pipe open."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def detach() -> None:
    """First thing in a child's main: the parent decides when it stops (end of
    input); a terminal's Ctrl-C or a process group's SIGTERM reaches the
    parent, which drains first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()


def serve(handle: Callable[[Message], Sequence[Any] | None], one_way: Collection[str] = ()) -> None:
    """The child's loop, until end of input: a request's answer is ("ok",
    *handle(message)), or ("error", text) when handle raises; a one-way
    message's failure goes to stderr."""
    # The protocol gets its own copy of stdout; stray prints go to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    with contextlib.suppress(BrokenPipeError):  # the parent went away mid-answer
        while True:
            message = _read(0)
            if message is None:
                return
            kind = message[0]
            try:
                answer = handle(message)
            except Exception as error:  # the parent's request fails; the child goes on
                if kind in one_way:
                    print(f"{kind} failed: {error!r}", file=sys.stderr)
                else:
                    _write(out, ("error", repr(error)))
                continue
            if kind not in one_way:
                _write(out, ("ok", *(answer or ())))
