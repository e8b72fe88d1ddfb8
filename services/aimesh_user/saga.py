"""Deleting a user everywhere: a saga persisted in the user service's database.

Steps, in order: chat, recommend, search and notify PurgeUserData, then the
account itself. Before the first step the account is disabled (no login,
refresh or API key), in the transaction that records the saga, and its tokens
are revoked from that moment (aimesh_runtime/revocation.py). No step runs
until that revocation is in force in every service (`revocation_wait_s` after
the saga began): a purge that ran earlier could be followed by data the
user's still-accepted token creates, which no saga would ever erase.

- Each peer step calls the peer's stub with a deadline, through a breaker,
  with this service's own token (admin scopes of the peers). PurgeUserData
  is idempotent (a repeat deletes 0), so a step that ran but was not
  recorded before a crash is simply run again.
- A failed step is retried with exponential backoff and jitter, for as long
  as it takes: erasure is owed to the user, and a saga that erased anything
  is only ever rolled forward.
- Compensation: if a step is refused for good (PERMISSION_DENIED,
  UNIMPLEMENTED...) on its first attempt while every earlier step was
  skipped, nothing can have been erased yet; the saga is ABORTED and the
  account enabled again. Later refusals are retried like any failure and
  show in the step's last_error until an operator fixes the cause.
- A peer whose address is not configured is SKIPPED, recorded as not
  deployed. Only dev allows that (prod refuses to start without all four).
- A crash at any point leaves the saga RUNNING with a lapsing lease; the
  resumer of any replica picks it up and goes on from the first step not
  done.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping

import grpc

from aimesh_runtime.auth import Principal
from aimesh_runtime.errors import NotFound
from aimesh_runtime.ownership import Owner
from aimesh_runtime.resilience import BreakerOpen
from aimesh_user.saga_store import DeletionRow, DeletionStore, LeaseLost

log = logging.getLogger(__name__)

PEER_STEPS = ("chat", "recommend", "search", "notify")
STEPS = (*PEER_STEPS, "user")
PEER_ADDRESS_ENV = {
    "chat": "AIMESH_CHAT_ADDRESS",
    "recommend": "AIMESH_RECOMMEND_ADDRESS",
    "search": "AIMESH_SEARCH_ADDRESS",
    "notify": "AIMESH_NOTIFY_ADDRESS",
}
# A peer answering these will answer them again: retrying cannot help.
REFUSED = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
    }
)

# Erase one user's data in a peer; returns the records it deleted.
Purge = Callable[[str], Awaitable[int]]


def deletion_name(deletion_id: str) -> str:
    return f"userDeletions/{deletion_id}"


class Deletions:
    def __init__(
        self,
        store: DeletionStore,
        peers: Mapping[str, Purge | None],
        *,
        retry_base_s: float = 1.0,
        retry_max_s: float = 300.0,
        lease_s: float = 60.0,
        resume_interval_s: float = 5.0,
        revocation_wait_s: float = 0.0,
    ) -> None:
        self._store = store
        self._revocation_wait_s = revocation_wait_s
        self._peers = peers
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._lease_s = lease_s
        self._resume_interval_s = resume_interval_s
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, caller: Principal, user_id: str) -> DeletionRow:
        """Disable the user and start (or find) the saga that deletes it."""
        deletion_id = await self._store.start(uuid.uuid4().hex, caller.subject, user_id, STEPS)
        if deletion_id is None:
            raise NotFound(f"users/{user_id} does not exist", metadata={"name": f"users/{user_id}"})
        self.kick(deletion_id)
        return await self._existing(deletion_id)

    async def wait(self, deletion_id: str, timeout_s: float) -> DeletionRow:
        """The saga once it ended, or as it stands after `timeout_s`."""
        task = self._tasks.get(deletion_id)
        if task is not None and timeout_s > 0:
            await asyncio.wait({task}, timeout=timeout_s)
        return await self._existing(deletion_id)

    async def owner_of(self, name: str) -> Owner | None:
        """Whose deletion `name` is; None if there is none."""
        row = await self._store.get(name.removeprefix("userDeletions/"))
        return None if row is None else Owner(row.user_id)

    async def get(self, caller: Principal, name: str) -> DeletionRow:
        deletion_id = name.removeprefix("userDeletions/")
        row = await self._store.get(deletion_id)
        # Someone else's deletion reads as absent.
        if row is None or (row.user_id != caller.subject and "user.admin" not in caller.scopes):
            raise NotFound(f"{name} does not exist", metadata={"name": name})
        return row

    async def _existing(self, deletion_id: str) -> DeletionRow:
        row = await self._store.get(deletion_id)
        if row is None:  # it was just written: only a wiped database gets here
            raise RuntimeError(f"{deletion_name(deletion_id)} vanished")
        return row

    def kick(self, deletion_id: str) -> None:
        """Run the saga in this process unless it already runs here."""
        if deletion_id in self._tasks:
            return
        task = asyncio.create_task(self.run(deletion_id), name=f"user-deletion-{deletion_id}")
        self._tasks[deletion_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(deletion_id, None))

    async def resume_forever(self) -> None:
        """Pick up sagas whose runner died (the lease lapsed), on every replica."""
        while True:
            try:
                for deletion_id in await self._store.unleased():
                    self.kick(deletion_id)
            except Exception:
                log.exception("scanning for unfinished user deletions failed")
            await asyncio.sleep(self._resume_interval_s)

    async def close(self) -> None:
        """Stop local runners; their leases lapse and another replica resumes."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def run(self, deletion_id: str) -> None:
        if not await self._store.claim(deletion_id):
            return  # ended, or another process runs it
        try:
            while await self._advance(deletion_id):
                pass
        except LeaseLost:
            log.warning("user deletion %s: lease lost to another process", deletion_id)
        except Exception:
            # A database failure: the lease lapses and the resumer tries again.
            log.exception("user deletion %s: runner failed; it will be resumed", deletion_id)

    async def _advance(self, deletion_id: str) -> bool:
        """Do (or wait for) the next step; False once the saga has ended."""
        saga = await self._existing(deletion_id)
        step = next((s for s in saga.steps if s.state == "PENDING"), None)
        if saga.state != "RUNNING" or step is None:
            return False
        in_force_at = saga.create_time + dt.timedelta(seconds=self._revocation_wait_s)
        for due in (in_force_at, step.next_attempt_time):
            if due is None:
                continue
            now = await self._store.now()
            wait_s = (due - now).total_seconds()
            if wait_s > 0:
                # Sleep in slices, renewing the lease so nobody else takes over.
                await asyncio.sleep(min(wait_s, self._lease_s / 3))
                await self._store.renew(deletion_id)
                return True
        if step.service == "user":
            await self._store.delete_account(saga, step.position)
            log.info("user deletion %s: users/%s deleted", deletion_id, saga.user_id)
            return False
        purge = self._peers.get(step.service)
        if purge is None:
            env = PEER_ADDRESS_ENV[step.service]
            await self._store.step_succeeded(
                deletion_id, step.position, 0, skipped=f"not deployed: {env} is not set"
            )
            return True
        await self._store.renew(deletion_id)  # the lease outlasts the call's deadline
        try:
            deleted = await purge(f"users/{saga.user_id}")
        except BreakerOpen as error:
            await self._retry(saga, step.position, step.attempts, str(error), False)
            return True
        except grpc.aio.AioRpcError as error:
            message = f"{error.code().name}: {error.details()}"
            erased_nothing = step.attempts == 0 and all(
                s.state == "SKIPPED" for s in saga.steps[: step.position]
            )
            if error.code() in REFUSED and erased_nothing:
                log.error("user deletion %s aborted at %s: %s", deletion_id, step.service, message)
                await self._store.abort(saga, step.position, f"{step.service}: {message}")
                return False
            await self._retry(saga, step.position, step.attempts, message, True)
            return True
        except (TimeoutError, OSError) as error:
            await self._retry(saga, step.position, step.attempts, repr(error), True)
            return True
        await self._store.step_succeeded(deletion_id, step.position, deleted)
        return True

    async def _retry(
        self, saga: DeletionRow, position: int, attempts: int, error: str, attempted: bool
    ) -> None:
        delay = min(self._retry_max_s, self._retry_base_s * 2 ** min(attempts, 20))
        delay *= random.uniform(0.5, 1.0)
        log.warning(
            "user deletion %s: %s failed (attempt %d), retrying in %.1f s: %s",
            saga.id, saga.steps[position].service, attempts + 1, delay, error,
        )  # fmt: skip
        await self._store.step_failed(saga.id, position, error, delay, attempted=attempted)
