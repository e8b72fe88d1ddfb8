"""Wiring of the search service: encoder, batcher, indexes, importer, servicer.

Health stays NOT_SERVING until every collection's index is rebuilt from the
database, so a restarted replica takes traffic only once it answers as before.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aimesh.search.v1 import search_service_pb2, search_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_search.batcher import BatcherMetrics, MicroBatcher, QueryCache
from aimesh_search.catalog import Catalog
from aimesh_search.encoder import Encoder
from aimesh_search.importer import Importer
from aimesh_search.servicer import SearchServicer
from aimesh_search.settings import SearchSettings
from aimesh_search.store import SearchStore

log = logging.getLogger(__name__)


async def mount(context: ServiceContext) -> Mount:
    settings: SearchSettings = context.settings
    store = SearchStore(context.pool)
    interrupted = await store.interrupt_orphaned_jobs()
    if interrupted:
        log.warning("%d import jobs were left running by a previous process", interrupted)
    loop = asyncio.get_running_loop()
    encoder = await loop.run_in_executor(
        None, Encoder, settings.model_path, settings.model_name, settings.device
    )
    metrics = BatcherMetrics(context.metrics_registry)
    cache = QueryCache(settings.cache_size)
    metrics.cache.labels("hit")  # both series exist from the first scrape
    metrics.cache.labels("miss")
    metrics.hit_ratio.set_function(lambda: cache.hit_rate)
    batcher = MicroBatcher(
        encoder.encode,
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
        catalog.close()

    return Mount(
        servicers=[
            (
                search_service_pb2_grpc.add_SearchServiceServicer_to_server,
                SearchServicer(catalog, importer),
            )
        ],
        background=[load_indexes],
        ready=lambda: catalog.loaded,
        close=close,
    )


SPEC = ServiceSpec(
    name="search",
    services=(search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
    settings=SearchSettings,
)
