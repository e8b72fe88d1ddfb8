"""The recommend service on port 0 with real PostgreSQL, a fake search service for
item text, training in its worker, fallbacks, cache invalidation and A/B results."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.recommend.v1 import recommend_service_pb2 as pb
from aimesh.recommend.v1 import recommend_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh_recommend.evaluation import planted
from aimesh_recommend.server import SPEC
from tests.conftest import (
    Running,
    admin_token,
    bearer,
    database_env,
    register_and_login,
    service_token,
    start_server,
)


class FakeSearch(search_service_pb2_grpc.SearchServiceServicer):
    """Search's contract over word overlap: enough to check what recommend sends."""

    def __init__(self) -> None:
        self.documents: dict[str, str] = {}
        self.collections: set[str] = set()

    async def CreateCollection(self, request: Any, context: Any) -> Any:
        if request.collection_id in self.collections:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "exists")
        self.collections.add(request.collection_id)
        return search_pb.CreateCollectionResponse()

    async def UpsertDocuments(self, request: Any, context: Any) -> Any:
        for document in request.documents:
            self.documents[document.name] = document.text
        return search_pb.UpsertDocumentsResponse(documents=request.documents)

    async def DeleteDocument(self, request: Any, context: Any) -> Any:
        self.documents.pop(request.name, None)
        return search_pb.DeleteDocumentResponse()

    async def Search(self, request: Any, context: Any) -> Any:
        words = set(request.query.lower().split())
        scored = sorted(
            ((len(words & set(text.lower().split())) / max(len(words), 1), name)
             for name, text in self.documents.items()),
            reverse=True,
        )  # fmt: skip
        return search_pb.SearchResponse(
            results=[
                search_pb.SearchResult(document=name, score=score, text=self.documents[name])
                for score, name in scored[: request.top_k]
                if score > 0
            ]
        )


@pytest.fixture(scope="module")
async def fake_search() -> AsyncIterator[tuple[FakeSearch, str]]:
    server = grpc.aio.server()
    fake = FakeSearch()
    search_service_pb2_grpc.add_SearchServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(0)


def env_for(user_server: Running, search_address: str, **extra: str) -> dict[str, str]:
    return {
        "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
        "AIMESH_USER_ADDRESS": user_server.address,
        "AIMESH_SEARCH_ADDRESS": search_address,
        "AIMESH_RECOMMEND_MIN_INTERACTIONS": "100",
        "AIMESH_RECOMMEND_REFRESH_S": "0.2",
        "AIMESH_RECOMMEND_SERVING_FLUSH_S": "0.05",
        "AIMESH_RECOMMEND_EPOCHS": "10",
        "AIMESH_RATE_LIMIT_RPS": "100000",
        "AIMESH_RATE_LIMIT_BURST": "100000",
        **extra,
    }


@pytest.fixture(scope="module")
async def server(
    user_server: Running, fake_search: tuple[FakeSearch, str], new_database: Any
) -> AsyncIterator[Running]:
    running = await start_server(
        [SPEC], new_database, extra_env=env_for(user_server, fake_search[1])
    )
    yield running
    await running.server.stop(0.5)


@pytest.fixture(scope="module")
async def tokens(users: Any) -> dict[str, Any]:
    # Most tests record for many users at once, as a backend does: a service account.
    alice, member = await register_and_login(users)
    return {
        "backend": bearer(await service_token(users)),
        "admin": bearer(await admin_token(users)),
        "member": bearer(member),
        "member_name": alice.name,
    }


@pytest.fixture(scope="module")
async def rec(server: Running) -> AsyncIterator[recommend_service_pb2_grpc.RecommendServiceStub]:
    async with server.channel() as channel:
        yield recommend_service_pb2_grpc.RecommendServiceStub(channel)


def interaction(user: str, item: str, kind: int = pb.INTERACTION_KIND_VIEW, **kw: Any) -> Any:
    return pb.Interaction(
        interaction_id=kw.pop("interaction_id", uuid.uuid4().hex),
        user=f"users/{user}", item=f"items/{item}", kind=kind, **kw,
    )  # fmt: skip


async def fails(code: grpc.StatusCode, call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_bad_input_is_invalid_argument_with_the_field(rec: Any, tokens: Any) -> None:
    md = tokens["backend"]
    cases = {
        "weight": interaction("a", "x", weight=-1.0),
        "weight ": interaction("a", "x", weight=math.nan),
    }
    future = timestamp_pb2.Timestamp(seconds=4_000_000_000)
    cases["event_time"] = interaction("a", "x", event_time=future)
    for field, bad in cases.items():
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            rec.RecordInteractions(pb.RecordInteractionsRequest(interactions=[bad]), metadata=md),
        )
        assert any(field.strip() in v for v in violations(error)), violations(error)
    for k in (0, 101):
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            rec.Recommend(pb.RecommendRequest(user="users/a", k=k), metadata=md),
        )
        assert "k" in violations(error)


async def test_too_little_data_says_how_much_is_needed(rec: Any, tokens: Any) -> None:
    error = await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        rec.TrainModel(
            pb.TrainModelRequest(training_job_id="early", training_job=pb.TrainingJob()),
            metadata=tokens["admin"],
        ),
    )
    assert "needs at least 100 interactions" in (error.details() or "")
    await fails(
        grpc.StatusCode.PERMISSION_DENIED,
        rec.TrainModel(
            pb.TrainModelRequest(training_job_id="early", training_job=pb.TrainingJob()),
            metadata=tokens["backend"],
        ),
    )


async def test_members_record_and_read_for_themselves_only(rec: Any, tokens: Any) -> None:
    md, me = tokens["member"], tokens["member_name"]
    mine = pb.Interaction(interaction_id=uuid.uuid4().hex, user="users/me", item="items/x", kind=1)
    reply = await rec.RecordInteractions(
        pb.RecordInteractionsRequest(interactions=[mine]), metadata=md
    )
    assert reply.recorded_count == 1
    await rec.Recommend(pb.RecommendRequest(user=me, k=3), metadata=md)
    forged = interaction("someone-else", "x")
    for call in (
        rec.RecordInteractions(pb.RecordInteractionsRequest(interactions=[forged]), metadata=md),
        rec.Recommend(pb.RecommendRequest(user="users/someone-else", k=3), metadata=md),
        rec.UpsertItems(
            pb.UpsertItemsRequest(items=[pb.Item(name="items/x", text="t")]), metadata=md
        ),
        rec.DeleteItem(pb.DeleteItemRequest(name="items/x"), metadata=md),
    ):
        await fails(grpc.StatusCode.PERMISSION_DENIED, call)


async def test_same_interaction_id_is_stored_once(rec: Any, tokens: Any) -> None:
    one = interaction("dup", "x", interaction_id="same-id")
    reply = await rec.RecordInteractions(
        pb.RecordInteractionsRequest(interactions=[one, one]), metadata=tokens["backend"]
    )
    assert (reply.recorded_count, reply.duplicate_count) == (1, 1)
    reply = await rec.RecordInteractions(
        pb.RecordInteractionsRequest(interactions=[one]), metadata=tokens["backend"]
    )
    assert (reply.recorded_count, reply.duplicate_count) == (0, 1)


async def test_without_a_model_the_popularity_fallback_answers(rec: Any, tokens: Any) -> None:
    reply = await rec.Recommend(
        pb.RecommendRequest(user="users/nobody", k=5), metadata=tokens["backend"]
    )
    assert reply.model_version == "v1" and reply.fallback
    assert reply.fallback_reason == pb.FALLBACK_REASON_MODEL_MISSING
    assert reply.serving_id


async def test_items_are_embedded_through_search(
    rec: Any, tokens: Any, fake_search: tuple[FakeSearch, str]
) -> None:
    md = tokens["backend"]
    items = [
        pb.Item(name=f"items/i{n}", text=f"item number {n} group g{n % 8}") for n in range(400)
    ]
    for start in range(0, 400, 200):
        reply = await rec.UpsertItems(
            pb.UpsertItemsRequest(items=items[start : start + 200]), metadata=md
        )
        assert all(item.content_embedded for item in reply.items)
    assert "collections/recommend-items/documents/i7" in fake_search[0].documents
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rec.UpsertItems(pb.UpsertItemsRequest(items=[items[0], items[0]]), metadata=md),
    )
    got = await rec.GetItem(pb.GetItemRequest(name="items/i3"), metadata=md)
    assert got.item.text == "item number 3 group g3"
    page = await rec.ListItems(pb.ListItemsRequest(page_size=150), metadata=md)
    rest = await rec.ListItems(
        pb.ListItemsRequest(page_size=500, page_token=page.next_page_token), metadata=md
    )
    assert len(page.items) + len(rest.items) == 400 and not rest.next_page_token
    await fails(
        grpc.StatusCode.NOT_FOUND, rec.GetItem(pb.GetItemRequest(name="items/zz"), metadata=md)
    )


async def wait_job(rec: Any, md: Any, name: str, timeout_s: float = 60) -> Any:
    for _ in range(int(timeout_s * 10)):
        job = (
            await rec.GetTrainingJob(pb.GetTrainingJobRequest(name=name), metadata=md)
        ).training_job
        if job.state not in (pb.TRAINING_JOB_STATE_PENDING, pb.TRAINING_JOB_STATE_RUNNING):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} did not finish")


async def test_train_serve_and_fall_back(rec: Any, tokens: Any) -> None:
    md, admin = tokens["backend"], tokens["admin"]
    events = planted(users=120, items=400, per_user=10, seed=3)
    batch = [
        interaction(u, i, event_time=timestamp_pb2.Timestamp(seconds=1_700_000_000 + int(t)))
        for u, i, _, t in events
    ]
    for start in range(0, len(batch), 1000):
        await rec.RecordInteractions(
            pb.RecordInteractionsRequest(interactions=batch[start : start + 1000]), metadata=md
        )
    request = pb.TrainModelRequest(training_job_id="first", training_job=pb.TrainingJob(epochs=8))
    started = await rec.TrainModel(request, metadata=admin)
    assert started.training_job.model_version == "v1"
    # Serving goes on while it trains, and a retry returns the same job.
    reply = await rec.Recommend(pb.RecommendRequest(user="users/u1", k=3), metadata=md)
    assert reply.fallback
    again = await rec.TrainModel(request, metadata=admin)
    assert again.training_job.name == "trainingJobs/first"
    job = await wait_job(rec, admin, "trainingJobs/first")
    assert job.state == pb.TRAINING_JOB_STATE_SUCCEEDED, job.error_message
    assert job.completed_epochs == 8 and job.progress == 1.0 and job.loss > 0
    await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        rec.CancelTrainingJob(
            pb.CancelTrainingJobRequest(name="trainingJobs/first"), metadata=admin
        ),
    )
    await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        rec.TrainModel(
            pb.TrainModelRequest(
                training_job_id="other", training_job=pb.TrainingJob(model_version="v1")
            ),
            metadata=admin,
        ),
    )
    versions = await rec.ListModelVersions(pb.ListModelVersionsRequest(), metadata=md)
    assert versions.serving_version == "v1"
    (v1,) = versions.model_versions
    assert v1.status == pb.MODEL_VERSION_STATUS_READY and "hr_at_10" in v1.metrics
    for _ in range(50):  # the refresh picks the version up
        reply = await rec.Recommend(pb.RecommendRequest(user="users/u1", k=10), metadata=md)
        if not reply.fallback:
            break
        await asyncio.sleep(0.1)
    assert not reply.fallback and reply.model_version == "v1" and len(reply.items) == 10
    seen = {f"items/{i}" for u, i, _, _ in events if u == "u1"}
    assert not seen & {item.item for item in reply.items}
    with_seen = await rec.Recommend(
        pb.RecommendRequest(user="users/u1", k=100, include_seen=True), metadata=md
    )
    assert seen & {item.item for item in with_seen.items}
    unknown = await rec.Recommend(pb.RecommendRequest(user="users/stranger", k=5), metadata=md)
    assert unknown.fallback and unknown.fallback_reason == pb.FALLBACK_REASON_USER_UNKNOWN
    assert unknown.model_version == "v1" and len(unknown.items) == 5


async def test_a_new_interaction_invalidates_the_cached_answer(rec: Any, tokens: Any) -> None:
    md = tokens["backend"]
    first = await rec.Recommend(pb.RecommendRequest(user="users/u2", k=5), metadata=md)
    again = await rec.Recommend(pb.RecommendRequest(user="users/u2", k=5), metadata=md)
    assert [i.item for i in first.items] == [i.item for i in again.items]
    top = first.items[0].item.removeprefix("items/")
    await rec.RecordInteractions(
        pb.RecordInteractionsRequest(interactions=[interaction("u2", top)]), metadata=md
    )
    after = await rec.Recommend(pb.RecommendRequest(user="users/u2", k=5), metadata=md)
    assert first.items[0].item not in {i.item for i in after.items}


async def test_similar_items(rec: Any, tokens: Any) -> None:
    md = tokens["backend"]
    known = await rec.SimilarItems(pb.SimilarItemsRequest(item="items/i1", k=5), metadata=md)
    assert not known.fallback and len(known.items) == 5
    assert "items/i1" not in {i.item for i in known.items}
    await rec.UpsertItems(
        pb.UpsertItemsRequest(items=[pb.Item(name="items/fresh", text="brand new group g5")]),
        metadata=md,
    )
    cold = await rec.SimilarItems(pb.SimilarItemsRequest(item="items/fresh", k=3), metadata=md)
    assert cold.fallback and cold.fallback_reason == pb.FALLBACK_REASON_ITEM_UNKNOWN
    assert len(cold.items) == 3 and all("fresh" not in i.item for i in cold.items)
    await fails(
        grpc.StatusCode.NOT_FOUND,
        rec.SimilarItems(pb.SimilarItemsRequest(item="items/nope", k=3), metadata=md),
    )
    await rec.DeleteItem(pb.DeleteItemRequest(name="items/fresh"), metadata=md)
    await fails(
        grpc.StatusCode.NOT_FOUND,
        rec.DeleteItem(pb.DeleteItemRequest(name="items/fresh"), metadata=md),
    )


async def test_a_catalogue_change_made_on_another_replica_reaches_serving(
    server: Running, rec: Any, tokens: Any
) -> None:
    md = tokens["backend"]
    request = pb.RecommendRequest(user="users/u3", k=5)
    first = await rec.Recommend(request, metadata=md)  # now cached
    top = first.items[0].item.removeprefix("items/")
    connection = await asyncpg.connect(server.environ[database_env("recommend")])
    try:  # as another replica's DeleteItem would
        before = await connection.fetchval("SELECT version FROM catalogue_version")
        await connection.execute("DELETE FROM items WHERE id = $1", top)
        assert await connection.fetchval("SELECT version FROM catalogue_version") > before
    finally:
        await connection.close()
    for _ in range(50):  # the refresh sees the new catalogue version
        after = await rec.Recommend(request, metadata=md)
        if first.items[0].item not in {i.item for i in after.items}:
            break
        await asyncio.sleep(0.1)
    assert first.items[0].item not in {i.item for i in after.items}
    assert len(after.items) == 5 and not after.fallback
    await fails(
        grpc.StatusCode.NOT_FOUND,
        rec.GetItem(pb.GetItemRequest(name=f"items/{top}"), metadata=md),
    )


async def test_cancel_a_training_job(rec: Any, tokens: Any) -> None:
    admin = tokens["admin"]
    await rec.TrainModel(
        pb.TrainModelRequest(
            training_job_id="long", training_job=pb.TrainingJob(model_version="v9", epochs=1000)
        ),
        metadata=admin,
    )
    await asyncio.sleep(0.3)
    cancelled = await rec.CancelTrainingJob(
        pb.CancelTrainingJobRequest(name="trainingJobs/long"), metadata=admin
    )
    assert cancelled.training_job.state == pb.TRAINING_JOB_STATE_CANCELLED
    twice = await rec.CancelTrainingJob(
        pb.CancelTrainingJobRequest(name="trainingJobs/long"), metadata=admin
    )
    assert twice.training_job.state == pb.TRAINING_JOB_STATE_CANCELLED
    versions = await rec.ListModelVersions(pb.ListModelVersionsRequest(), metadata=admin)
    v9 = next(v for v in versions.model_versions if v.version == "v9")
    assert v9.status == pb.MODEL_VERSION_STATUS_FAILED
    await fails(
        grpc.StatusCode.NOT_FOUND,
        rec.GetTrainingJob(pb.GetTrainingJobRequest(name="trainingJobs/none"), metadata=admin),
    )


async def test_ab_results_attribute_outcomes_to_the_serving_version(
    rec: Any, tokens: Any, server: Running, new_database: Any
) -> None:
    md, admin = tokens["backend"], tokens["admin"]
    await rec.TrainModel(
        pb.TrainModelRequest(
            training_job_id="second", training_job=pb.TrainingJob(model_version="v2", epochs=2)
        ),
        metadata=admin,
    )
    assert (
        await wait_job(rec, admin, "trainingJobs/second")
    ).state == pb.TRAINING_JOB_STATE_SUCCEEDED
    # A second deployment on the same database serves v2, with search unreachable.
    environ = {
        **server.environ,
        "AIMESH_RECOMMEND_MODEL_VERSION": "v2",
        "AIMESH_SEARCH_ADDRESS": "127.0.0.1:1",
    }
    other = await start_server([SPEC], new_database, extra_env=environ)
    try:
        async with other.channel() as channel:
            rec2 = recommend_service_pb2_grpc.RecommendServiceStub(channel)
            conversions = {"v1": 0, "v2": 0}
            since = timestamp_pb2.Timestamp()
            since.GetCurrentTime()  # earlier tests served v1 too: count from here
            for n in range(20):
                stub, version = (rec, "v1") if n % 2 else (rec2, "v2")
                reply = await stub.Recommend(
                    pb.RecommendRequest(user=f"users/u{50 + n}", k=3), metadata=md
                )
                assert reply.model_version == version
                if n < 8:  # a click attributed to the serving
                    conversions[version] += 1
                    await rec.RecordInteractions(
                        pb.RecordInteractionsRequest(interactions=[interaction(
                            f"u{50 + n}", reply.items[0].item.removeprefix("items/"),
                            pb.INTERACTION_KIND_CLICK, serving_id=reply.serving_id)]),
                        metadata=md,
                    )  # fmt: skip
            stored = await rec2.UpsertItems(
                pb.UpsertItemsRequest(items=[pb.Item(name="items/offline", text="search is down")]),
                metadata=md,
            )
            assert not stored.items[0].content_embedded  # stored, waiting for content features
        for _ in range(100):  # servings are written in batches, off the request path
            results = await rec.GetExperimentResults(
                pb.GetExperimentResultsRequest(
                    control_version="v1", treatment_version="v2", start_time=since
                ),
                metadata=md,
            )
            if [v.exposures for v in results.variants] == [10, 10]:
                break
            await asyncio.sleep(0.1)
    finally:
        await other.server.stop(0.5)
    control, treatment = results.variants
    assert (control.model_version, control.exposures, control.conversions) == (
        "v1",
        10,
        conversions["v1"],
    )
    assert (treatment.exposures, treatment.conversions) == (10, conversions["v2"])
    assert control.rate_ci_low <= control.rate <= control.rate_ci_high
    assert results.verdict == "not significant yet" and 0 < results.p_value <= 1
    assert results.required_exposures > 0
    await fails(
        grpc.StatusCode.NOT_FOUND,
        rec.GetExperimentResults(
            pb.GetExperimentResultsRequest(control_version="v1", treatment_version="v7"),
            metadata=md,
        ),
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rec.GetExperimentResults(
            pb.GetExperimentResultsRequest(control_version="v1", treatment_version="v1"),
            metadata=md,
        ),
    )


async def test_purge_user_data(rec: Any, tokens: Any) -> None:
    await rec.RecordInteractions(
        pb.RecordInteractionsRequest(interactions=[interaction("purged", "i1") for _ in range(10)]),
        metadata=tokens["backend"],
    )
    request = pb.PurgeUserDataRequest(user="users/purged")
    await fails(
        grpc.StatusCode.PERMISSION_DENIED, rec.PurgeUserData(request, metadata=tokens["backend"])
    )
    first = await rec.PurgeUserData(request, metadata=tokens["admin"])
    assert first.deleted_interactions == 10
    assert (await rec.PurgeUserData(request, metadata=tokens["admin"])).deleted_interactions == 0
