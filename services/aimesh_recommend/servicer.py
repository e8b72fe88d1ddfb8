"""RecommendService: proto in, domain call, proto out."""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import json_format

from aimesh.recommend.v1 import recommend_service_pb2 as pb
from aimesh.recommend.v1 import recommend_service_pb2_grpc
from aimesh_recommend import stats
from aimesh_recommend.experiments import ModelRegistry
from aimesh_recommend.recommender import FallbackReason, Recommender
from aimesh_recommend.store import ItemRow, JobRow, NewInteraction, VersionRow
from aimesh_recommend.training import Trainer
from aimesh_runtime.errors import InvalidArgument
from aimesh_runtime.metrics import ModelMetrics
from aimesh_runtime.pages import (
    struct,
    timestamp,
)


def _item_id(name: str) -> str:
    return name.removeprefix("items/")


def item_proto(row: ItemRow) -> pb.Item:
    return pb.Item(
        name=f"items/{row.id}",
        text=row.text,
        metadata=struct(row.metadata),
        content_embedded=row.content_embedded,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def job_proto(row: JobRow) -> pb.TrainingJob:
    return pb.TrainingJob(
        name=f"trainingJobs/{row.id}",
        model_version=row.model_version,
        epochs=row.epochs,
        state=pb.TrainingJobState.Value(f"TRAINING_JOB_STATE_{row.state}"),
        completed_epochs=row.completed_epochs,
        progress=row.progress,
        loss=row.loss,
        training_interactions=row.training_interactions,
        error_message=row.error_message,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        end_time=timestamp(row.end_time),
    )


def version_proto(row: VersionRow) -> pb.ModelVersion:
    ready = row.status == "READY"
    return pb.ModelVersion(
        name=f"modelVersions/{row.version}",
        version=row.version,
        status=pb.ModelVersionStatus.Value(f"MODEL_VERSION_STATUS_{row.status}"),
        metrics=row.metrics,
        # The state dict lives in the registry row itself (bytea), not in a file.
        artifact_uri=f"postgresql:model_versions/{row.version}#artifact" if ready else "",
        training_job=row.training_job,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def _interaction(index: int, message: pb.Interaction, now: dt.datetime) -> NewInteraction:
    event_time = message.event_time.ToDatetime(dt.UTC) if message.HasField("event_time") else now
    if event_time > now + dt.timedelta(hours=1):  # also checked by protovalidate
        raise InvalidArgument.field(
            f"interactions[{index}].event_time", "must not be more than an hour in the future"
        )
    weight = message.weight
    if not weight >= 0 or weight == float("inf"):  # NaN fails every comparison
        raise InvalidArgument.field(
            f"interactions[{index}].weight", "must be finite and not negative"
        )
    return NewInteraction(
        id=message.interaction_id,
        user=message.user,
        item=_item_id(message.item),
        kind=message.kind,
        weight=weight or 1.0,
        event_time=event_time,
        serving_id=message.serving_id,
    )


def _fallback_proto(reason: FallbackReason) -> pb.FallbackReason.ValueType:
    if reason is FallbackReason.NONE:
        return pb.FALLBACK_REASON_UNSPECIFIED
    return pb.FallbackReason.Value(f"FALLBACK_REASON_{reason.name}")


class RecommendServicer(recommend_service_pb2_grpc.RecommendServiceServicer):
    def __init__(
        self,
        recommender: Recommender,
        trainer: Trainer,
        registry: ModelRegistry,
        model_metrics: ModelMetrics | None = None,
    ) -> None:
        self._recommender = recommender
        self._trainer = trainer
        self._registry = registry
        self._model_metrics = model_metrics

    async def RecordInteractions(
        self, request: pb.RecordInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordInteractionsResponse:
        now = dt.datetime.now(dt.UTC)
        interactions = [_interaction(n, i, now) for n, i in enumerate(request.interactions)]
        recorded, duplicates = await self._recommender.record(interactions)
        return pb.RecordInteractionsResponse(recorded_count=recorded, duplicate_count=duplicates)

    async def UpsertItems(
        self, request: pb.UpsertItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpsertItemsResponse:
        items = [
            (_item_id(i.name), i.text, json_format.MessageToDict(i.metadata)) for i in request.items
        ]
        rows = await self._recommender.upsert_items(items)
        return pb.UpsertItemsResponse(items=[item_proto(r) for r in rows])

    async def GetItem(
        self, request: pb.GetItemRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetItemResponse:
        row = await self._recommender.item(_item_id(request.name))
        return pb.GetItemResponse(item=item_proto(row))

    async def ListItems(
        self, request: pb.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListItemsResponse:
        rows, token = await self._recommender.list_items(request.page_size, request.page_token)
        return pb.ListItemsResponse(items=[item_proto(r) for r in rows], next_page_token=token)

    async def DeleteItem(
        self, request: pb.DeleteItemRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteItemResponse:
        await self._recommender.delete_item(_item_id(request.name))
        return pb.DeleteItemResponse()

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        if not 1 <= request.k <= 100:  # also checked by protovalidate
            raise InvalidArgument.field("k", "must be between 1 and 100")
        found = await self._recommender.recommend(request.user, request.k, request.include_seen)
        if self._model_metrics is not None:
            self._model_metrics.count_variant("recommend", found.model_version)
        return pb.RecommendResponse(
            items=[pb.ScoredItem(item=f"items/{i}", score=s) for i, s in found.items],
            model_version=found.model_version,
            fallback=found.fallback_reason is not FallbackReason.NONE,
            fallback_reason=_fallback_proto(found.fallback_reason),
            serving_id=found.serving_id,
        )

    async def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SimilarItemsResponse:
        if not 1 <= request.k <= 100:
            raise InvalidArgument.field("k", "must be between 1 and 100")
        found = await self._recommender.similar(_item_id(request.item), request.k)
        return pb.SimilarItemsResponse(
            items=[pb.ScoredItem(item=f"items/{i}", score=s) for i, s in found.items],
            model_version=self._recommender.version,
            fallback=found.fallback_reason is not FallbackReason.NONE,
            fallback_reason=_fallback_proto(found.fallback_reason),
        )

    async def TrainModel(
        self, request: pb.TrainModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainModelResponse:
        job = request.training_job
        row = await self._trainer.start(request.training_job_id, job.model_version, job.epochs)
        return pb.TrainModelResponse(training_job=job_proto(row))

    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTrainingJobResponse:
        row = await self._trainer.get(request.name.removeprefix("trainingJobs/"))
        return pb.GetTrainingJobResponse(training_job=job_proto(row))

    async def CancelTrainingJob(
        self, request: pb.CancelTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTrainingJobResponse:
        row = await self._trainer.cancel(request.name.removeprefix("trainingJobs/"))
        return pb.CancelTrainingJobResponse(training_job=job_proto(row))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        rows, token = await self._registry.list_versions(request.page_size, request.page_token)
        return pb.ListModelVersionsResponse(
            model_versions=[version_proto(r) for r in rows],
            next_page_token=token,
            serving_version=self._recommender.version,
        )

    async def GetExperimentResults(
        self, request: pb.GetExperimentResultsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetExperimentResultsResponse:
        found = await self._registry.experiment(
            request.control_version,
            request.treatment_version,
            list(request.conversion_kinds),
            request.start_time.ToDatetime(dt.UTC) if request.HasField("start_time") else None,
            request.end_time.ToDatetime(dt.UTC) if request.HasField("end_time") else None,
        )
        variants = []
        for variant, (low, high) in zip(
            (found.control, found.treatment), found.comparison.intervals, strict=True
        ):
            variants.append(
                pb.VariantResult(
                    model_version=variant.version,
                    exposures=variant.exposures,
                    conversions=variant.conversions,
                    rate=variant.rate,
                    rate_ci_low=low,
                    rate_ci_high=high,
                )
            )
        return pb.GetExperimentResultsResponse(
            variants=variants,
            test=stats.TEST_NAME,
            p_value=found.comparison.p_value,
            confidence_level=stats.LEVEL,
            verdict=found.comparison.verdict,
            winner=found.comparison.winner,
            required_exposures=found.comparison.required_exposures,
        )

    async def PurgeUserData(
        self, request: pb.PurgeUserDataRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurgeUserDataResponse:
        return pb.PurgeUserDataResponse(
            deleted_interactions=await self._recommender.purge(request.user)
        )
