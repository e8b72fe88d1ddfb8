"""Training as a long-running operation: a job row, a worker thread, a registered version.

TrainModel only checks there is enough data, writes the job (PENDING) and its
version (TRAINING), and returns; the model trains on a thread of its own, so
serving goes on. Progress is written after every epoch; a cancel is seen
within one mini-batch. On success the artifact, the metrics, READY and a
"recommend.model_trained" outbox event commit in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from aimesh_recommend import model as mf
from aimesh_recommend.evaluation import Split, leave_last_out, popularity_scorer, ranking_metrics
from aimesh_recommend.settings import RecommendSettings
from aimesh_recommend.store import Conflict, JobRow, RecommendStore
from aimesh_runtime import outbox
from aimesh_runtime.errors import AlreadyExists, FailedPrecondition, NotFound

log = logging.getLogger(__name__)
MIN_ITEMS = 2
TRAIN_SHARE = 0.95  # of progress; evaluation and registering take the rest


def evaluate(
    split_model: mf.MatrixFactorization, split: Split, device: torch.device
) -> dict[str, float]:
    """Held-out HR@10 and NDCG@10 of the model, and of popularity for comparison."""
    users_w = split_model.user.weight.detach()
    items_w = split_model.item.weight.detach()
    bias = split_model.item_bias.weight.detach().squeeze(-1)

    def score(users: np.ndarray) -> torch.Tensor:
        rows = torch.as_tensor(users, device=device)
        return users_w[rows] @ items_w.T + bias

    with torch.inference_mode():
        found = ranking_metrics(split, score)
        baseline = ranking_metrics(split, popularity_scorer(split.train))
    return {
        **found,
        "popularity_hr_at_10": baseline["hr_at_10"],
        "popularity_ndcg_at_10": baseline["ndcg_at_10"],
        "held_out_users": float(len(split.held_users)),
    }


class Trainer:
    def __init__(
        self,
        store: RecommendStore,
        settings: RecommendSettings,
        device: torch.device,
        on_ready: Callable[[str], Awaitable[None]],
    ) -> None:
        self._store = store
        self._settings = settings
        self._device = device
        self._on_ready = on_ready
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trainer")
        self._stops: dict[str, threading.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, job_id: str, version: str, epochs: int) -> JobRow:
        existing = await self._store.job(job_id)
        if existing is not None:
            if (version and version != existing.model_version) or (
                epochs and epochs != existing.epochs
            ):
                raise AlreadyExists(
                    f"trainingJobs/{job_id} exists with other parameters",
                    reason="TRAINING_JOB_EXISTS",
                    metadata={"training_job": f"trainingJobs/{job_id}"},
                )
            return existing
        count, users, items = await self._store.interaction_counts()
        need = self._settings.min_interactions
        need_users = self._settings.min_users
        if count < need or users < need_users or items < MIN_ITEMS:
            raise FailedPrecondition(
                f"too little data to train: needs at least {need} interactions from "
                f"{need_users} users over {MIN_ITEMS} items; there are {count} from "
                f"{users} users over {items} items",
                reason="NOT_ENOUGH_INTERACTIONS",
                metadata={
                    "needed_interactions": str(need),
                    "needed_users": str(need_users),
                    "interactions": str(count),
                    "users": str(users),
                },
            )
        chosen = version or await self._store.next_version()
        try:
            job = await self._store.create_job(
                job_id, chosen, epochs or self._settings.default_epochs, count
            )
        except Conflict:
            raise AlreadyExists(
                f"modelVersions/{chosen} already exists",
                reason="MODEL_VERSION_EXISTS",
                metadata={"model_version": chosen},
            ) from None
        stop = threading.Event()
        self._stops[job_id] = stop
        task = asyncio.create_task(self._run(job, stop), name=f"train-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def get(self, job_id: str) -> JobRow:
        job = await self._store.job(job_id)
        if job is None:
            raise NotFound(
                f"trainingJobs/{job_id} does not exist",
                reason="TRAINING_JOB_NOT_FOUND",
                metadata={"training_job": f"trainingJobs/{job_id}"},
            )
        return job

    async def cancel(self, job_id: str) -> JobRow:
        ended = await self._store.end_job(job_id, "CANCELLED")
        stop = self._stops.get(job_id)
        if stop is not None:
            stop.set()
        if ended is not None:
            return ended
        job = await self.get(job_id)
        if job.state == "CANCELLED":
            return job
        raise FailedPrecondition(
            f"trainingJobs/{job_id} has already {job.state.lower()}",
            reason="TRAINING_JOB_ENDED",
            metadata={"state": job.state},
        )

    async def _run(self, job: JobRow, stop: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        try:
            if await self._store.update_job(job.id, state="RUNNING") is None:
                return  # cancelled while pending
            events = await self._store.training_events()
            split = leave_last_out(events)
            await self._store.update_job(job.id, training_interactions=len(events))
            options = mf.TrainingOptions(dimension=self._settings.dimension, epochs=job.epochs)

            def on_epoch(done: int, loss: float) -> None:
                update = self._store.update_job(
                    job.id,
                    completed_epochs=done,
                    loss=loss,
                    progress=TRAIN_SHARE * done / job.epochs,
                )
                if asyncio.run_coroutine_threadsafe(update, loop).result(30) is None:
                    stop.set()  # ended elsewhere (cancelled by another replica)

            def fit() -> tuple[mf.MatrixFactorization, dict[str, float]]:
                trained = mf.train(split.train, options, self._device, on_epoch, stop.is_set)
                return trained, evaluate(trained, split, self._device)

            trained, metrics = await loop.run_in_executor(self._executor, fit)
            current = await self._store.job(job.id)
            metrics["loss"] = current.loss if current is not None else 0.0
            blob = mf.to_bytes(trained)
            async with self._store.pool.acquire() as connection, connection.transaction():
                registered = await self._store.register(
                    connection,
                    job.model_version,
                    blob,
                    split.train.user_ids,
                    split.train.item_ids,
                    metrics,
                )
                if not registered or (
                    await self._store.end_job(job.id, "SUCCEEDED", connection=connection) is None
                ):
                    raise mf.Cancelled()  # rolls the registration back
                await outbox.emit(
                    connection,
                    topic="recommend.model_trained",
                    key=f"modelVersions/{job.model_version}",
                    payload={
                        "model_version": job.model_version,
                        "training_job": f"trainingJobs/{job.id}",
                        "metrics": metrics,
                        "training_interactions": len(events),
                    },
                )
            log.info("model %s trained: %s", job.model_version, metrics)
            await self._on_ready(job.model_version)
        except mf.Cancelled:
            log.info("training job %s cancelled", job.id)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(Exception):
                await self._store.end_job(job.id, "FAILED", "interrupted: the service stopped")
            raise
        except Exception as error:
            log.exception("training job %s failed", job.id)
            await self._store.end_job(job.id, "FAILED", f"{type(error).__name__}: {error}")
        finally:
            self._stops.pop(job.id, None)

    async def close(self) -> None:
        for stop in self._stops.values():
            stop.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._executor.shutdown(wait=False, cancel_futures=True)
