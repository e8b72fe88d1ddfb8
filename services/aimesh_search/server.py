"""Wiring of the search service: encoder, batcher, indexes, importer, servicer.

Health stays NOT_SERVING until every collection's index is rebuilt from the
database, so a restarted replica takes traffic only once it answers as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from aimesh.search.v1 import search_service_pb2, search_service_pb2_grpc
from aimesh_runtime.errors import NotFound
from aimesh_runtime.metrics import ModelMetrics
from aimesh_runtime.ownership import OwnerResolver
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_search.batcher import BatcherMetrics, EncoderBatcher
from aimesh_search.cache import QueryCache
from aimesh_search.catalog import Catalog
from aimesh_search.encoder import Encoder, EncoderInfo, pick_device
from aimesh_search.encoder_process import EncoderProcess
from aimesh_search.importer import Importer
from aimesh_search.reserved import ReservedCollections
from aimesh_search.servicer import SearchServicer
from aimesh_search.settings import SearchSettings
from aimesh_search.store import SearchStore

log = logging.getLogger(__name__)


def copies_on_cpu(settings: SearchSettings) -> tuple[int, int]:
    """(encoder copies, torch threads each) on a CPU (see aimesh_runtime.batching
    for why copies beat one model on every core)."""
    cores = len(os.sched_getaffinity(0))
    workers = settings.encoder_workers or min(cores, 4)
    return workers, settings.torch_threads or max(1, cores // workers)


def load_encoders(settings: SearchSettings) -> list[Encoder]:
    """The in-process encoder copies the batcher runs side by side, one per lane."""
    first = Encoder(settings.model_path, settings.model_name, settings.device)
    if first.device != "cpu":
        return [first]  # a GPU runs one batch at a time best
    workers, threads = copies_on_cpu(settings)
    import torch

    torch.set_num_threads(threads)
    copies = [first]
    while len(copies) < workers:
        # Copies, not one shared model: its tokenizer is not safe across threads.
        copies.append(Encoder(settings.model_path, settings.model_name, "cpu"))
    log.info("%d encoder copies, %d torch threads each", workers, torch.get_num_threads())
    return copies


async def start_encoder_processes(
    settings: SearchSettings,
) -> tuple[list[EncoderProcess], EncoderInfo]:
    """The encoder copies as child processes, one per lane, their models loaded."""
    workers, threads = copies_on_cpu(settings)
    processes = [
        EncoderProcess(settings.model_path, settings.model_name, threads) for _ in range(workers)
    ]
    try:  # the copies load their models side by side
        infos = await asyncio.gather(*(process.describe() for process in processes))
    except BaseException:
        await asyncio.gather(*(process.close() for process in processes))
        raise
    log.info(
        "%d encoder processes (%s), %d torch threads each",
        workers, ", ".join(str(process.pid) for process in processes), threads,
    )  # fmt: skip
    return processes, infos[0]


async def mount(context: ServiceContext) -> Mount:
    settings: SearchSettings = context.settings
    store = SearchStore(context.pool)
    interrupted = await store.interrupt_orphaned_jobs()
    if interrupted:
        log.warning("%d import jobs were left running by a previous process", interrupted)
    loop = asyncio.get_running_loop()
    processes: list[EncoderProcess] = []
    if settings.encoder_process and pick_device(settings.device) == "cpu":
        processes, encoder = await start_encoder_processes(settings)
        lanes, remote = [], [process.encode for process in processes]
    else:
        encoders = await loop.run_in_executor(None, load_encoders, settings)
        encoder = encoders[0].info
        lanes, remote = [copy.encode for copy in encoders], None
    metrics = BatcherMetrics(context.metrics_registry)
    ModelMetrics.of(context.metrics_registry)  # GPU utilisation and memory, when present
    cache = QueryCache(settings.cache_size)
    metrics.cache.labels("hit")  # both series exist from the first scrape
    metrics.cache.labels("miss")
    metrics.hit_ratio.set_function(lambda: cache.hit_rate)
    batcher = EncoderBatcher(
        lanes,
        remote=remote,
        enabled=settings.batching,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        queue_size=settings.queue_size,
        metrics=metrics,
    )
    batcher.start()
    catalog = Catalog(store, encoder, batcher, cache, settings, metrics)
    importer = Importer(store, catalog, batcher, settings.import_batch)

    async def load_indexes() -> None:
        await catalog.load()
        await asyncio.Event().wait()  # keep the task alive; the server cancels it at stop

    async def close() -> None:
        await batcher.close()
        await asyncio.gather(*(process.close() for process in processes))
        catalog.close()

    return Mount(
        servicers=[
            (
                search_service_pb2_grpc.add_SearchServiceServicer_to_server,
                SearchServicer(
                    catalog,
                    importer,
                    ReservedCollections(settings.reserved_collections.split(",")),
                ),
            )
        ],
        background=[load_indexes],
        ready=lambda: catalog.loaded,
        close=close,
        owners={"collections": OwnerResolver(catalog.owner_of, _hidden)},
    )


def _hidden(name: str) -> NotFound:
    """A collection the caller may not see reads exactly as a missing one."""
    return NotFound(f"{name} does not exist", metadata={"name": name})


SPEC = ServiceSpec(
    name="search",
    services=(search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
    settings=SearchSettings,
)
