"""Wiring of the recommend service: store, cache, search client, batcher, trainer, servicer.

Health stays NOT_SERVING until the catalogue and popularity have been read
once (and the served version loaded, if it is READY), so a restarted replica
answers as before from its first request. A version not yet READY is loaded by
the periodic refresh as soon as it is, and meanwhile the fallback answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from aimesh.recommend.v1 import recommend_service_pb2, recommend_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2
from aimesh_recommend.batcher import scoring_batcher
from aimesh_recommend.cache import build_cache
from aimesh_recommend.content import ContentIndex
from aimesh_recommend.experiments import ModelRegistry
from aimesh_recommend.model import pick_device
from aimesh_recommend.recommender import Recommender, ServingLog
from aimesh_recommend.scoring_process import ScoringProcess
from aimesh_recommend.servicer import RecommendServicer
from aimesh_recommend.settings import RecommendSettings
from aimesh_recommend.store import RecommendStore
from aimesh_recommend.training import Trainer
from aimesh_runtime.client import connect
from aimesh_runtime.metrics import ModelMetrics
from aimesh_runtime.resilience import CircuitBreaker
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec

log = logging.getLogger(__name__)


async def mount(context: ServiceContext) -> Mount:
    settings: RecommendSettings = context.settings
    store = RecommendStore(context.pool)
    interrupted = await store.interrupt_orphaned_jobs()
    if interrupted:
        log.warning("%d training jobs were left running by a previous process", interrupted)
    device = pick_device(settings.device)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # The dashboard's model panels (batch size, queue, A/B share) read these.
    model_metrics = ModelMetrics.of(context.metrics_registry)
    scorer: ScoringProcess | None = None
    if settings.scoring_process and device.type == "cpu":  # a GPU scores without the GIL's help
        scorer = ScoringProcess(settings.torch_threads)
        await scorer.start()
    batcher = scoring_batcher(
        settings,
        context.metrics_registry,
        model_metrics,
        scorer.score_batch if scorer is not None else None,
    )
    batcher.start()
    search_channel = connect(
        settings.search_address,
        search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],
        tracer_provider=context.tracer_provider,
    )
    content = ContentIndex(
        search_channel,
        CircuitBreaker("search"),
        settings.search_collection,
        timeout_s=settings.search_timeout_s,
    )
    servings = ServingLog(store, settings.serving_flush_s)
    recommender = Recommender(
        store,
        settings,
        build_cache(settings.redis_url, settings.cache_ttl_s, settings.cache_size),
        batcher,
        content,
        servings,
        device,
    )

    async def trained(version: str) -> None:
        if version == recommender.version:
            await recommender.refresh()

    trainer = Trainer(store, settings, device, trained)
    log.info(
        "serving model version %s on %s, scoring in %s",
        settings.model_version, device,
        f"process {scorer.pid}" if scorer is not None else "this process",
    )  # fmt: skip

    async def close() -> None:
        await trainer.close()
        await batcher.close()
        if scorer is not None:
            await scorer.close()
        await recommender.close()
        await search_channel.close()

    return Mount(
        servicers=[
            (
                recommend_service_pb2_grpc.add_RecommendServiceServicer_to_server,
                RecommendServicer(recommender, trainer, ModelRegistry(store), model_metrics),
            )
        ],
        background=[recommender.run_refresh, servings.run],
        ready=lambda: recommender.loaded,
        close=close,
    )


SPEC = ServiceSpec(
    name="recommend",
    services=(recommend_service_pb2.DESCRIPTOR.services_by_name["RecommendService"],),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
    settings=RecommendSettings,
)
