"""The search service with the real packaged encoder on CPU, real FAISS, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from aimesh.search.v1 import search_service_pb2 as pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh_search.encoder import Encoder
from aimesh_search.server import SPEC
from tests.conftest import Running, bearer, register_and_login, start_server

ANIMALS = {
    "cat": "Cats are small domestic felines that purr and chase mice.",
    "dog": "Dogs are loyal companions that bark and fetch sticks.",
    "rocket": "Rockets burn fuel to launch satellites into orbit.",
    "bread": "Bread is baked from flour, water, yeast and salt.",
    "piano": "The piano is a keyboard instrument with hammers and strings.",
}


@pytest.fixture(scope="module")
async def search_env(user_server: Running) -> dict[str, str]:
    return {
        "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
        "AIMESH_USER_ADDRESS": user_server.address,
        "AIMESH_SEARCH_ANN_THRESHOLD": "1000",
        "AIMESH_SEARCH_IMPORT_BATCH": "40",
    }


@pytest.fixture(scope="module")
async def search_server(search_env: dict[str, str], new_database: Any) -> AsyncIterator[Running]:
    running = await start_server([SPEC], new_database, extra_env=search_env)
    yield running
    await running.server.stop(0.5)


@pytest.fixture(scope="module")
async def token(users: Any) -> str:
    _, access = await register_and_login(users)
    return access


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder("", "all-MiniLM-L6-v2", "cpu")


def stub(running: Running) -> tuple[grpc.aio.Channel, search_service_pb2_grpc.SearchServiceStub]:
    channel = running.channel()
    return channel, search_service_pb2_grpc.SearchServiceStub(channel)


def doc(collection: str, doc_id: str, text: str, **metadata: Any) -> pb.Document:
    values = struct_pb2.Struct()
    values.update(metadata)
    return pb.Document(
        name=f"collections/{collection}/documents/{doc_id}", text=text, metadata=values
    )


async def make_collection(search: Any, token: str, name: str) -> None:
    await search.CreateCollection(
        pb.CreateCollectionRequest(collection_id=name, collection=pb.Collection()),
        metadata=bearer(token),
    )


async def expect(code: grpc.StatusCode, call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def test_documents_round_trip_and_search_ranks_by_meaning(
    search_server: Running, token: str
) -> None:
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, "animals")
        collection = (
            await search.GetCollection(
                pb.GetCollectionRequest(name="collections/animals"), metadata=bearer(token)
            )
        ).collection
        assert (collection.embedding_model, collection.dimension) == ("all-MiniLM-L6-v2", 384)
        assert collection.index_type == pb.INDEX_TYPE_EXACT and collection.max_input_tokens == 256
        upserted = await search.UpsertDocuments(
            pb.UpsertDocumentsRequest(
                parent="collections/animals",
                documents=[
                    doc("animals", k, v, kind=k, legs=4 if k in ("cat", "dog") else 0)
                    for k, v in ANIMALS.items()
                ],
            ),
            metadata=bearer(token),
        )
        assert len(upserted.documents) == 5 and upserted.documents[0].owner.startswith("users/")
        reply = await search.Search(
            pb.SearchRequest(parent="collections/animals", query="a kitten purring", top_k=2),
            metadata=bearer(token),
        )
        assert reply.results[0].document == "collections/animals/documents/cat"
        assert (
            reply.results[0].score > reply.results[1].score
            and reply.results[0].text == ANIMALS["cat"]
        )
        assert reply.results[0].metadata["legs"] == 4
        got = await search.GetDocument(
            pb.GetDocumentRequest(name="collections/animals/documents/dog"), metadata=bearer(token)
        )
        assert got.document.text == ANIMALS["dog"]
        batch = await search.BatchSearch(
            pb.BatchSearchRequest(
                parent="collections/animals",
                requests=[
                    pb.SearchRequest(parent="collections/animals", query=q, top_k=1)
                    for q in ("orbit launch", "sourdough loaf", "grand piano keys")
                ],
            ),
            metadata=bearer(token),
        )
        assert [r.results[0].document.rsplit("/", 1)[1] for r in batch.responses] == [
            "rocket",
            "bread",
            "piano",
        ]
        high = await search.Search(
            pb.SearchRequest(
                parent="collections/animals", query="a kitten purring", top_k=5, min_score=0.3
            ),
            metadata=bearer(token),
        )
        assert all(r.score >= 0.3 for r in high.results) and len(high.results) < 5


async def test_bad_input_gets_clear_statuses(search_server: Running, token: str) -> None:
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, "bad")
        md = bearer(token)
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            search.Search(
                pb.SearchRequest(parent="collections/bad", query="   ", top_k=3), metadata=md
            ),
        )
        for k in (0, 101):
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                search.Search(
                    pb.SearchRequest(parent="collections/bad", query="x", top_k=k), metadata=md
                ),
            )
        await expect(
            grpc.StatusCode.NOT_FOUND,
            search.Search(
                pb.SearchRequest(parent="collections/nope", query="x", top_k=3), metadata=md
            ),
        )
        await expect(
            grpc.StatusCode.ALREADY_EXISTS,
            search.CreateCollection(
                pb.CreateCollectionRequest(collection_id="bad", collection=pb.Collection()),
                metadata=md,
            ),
        )
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            search.CreateCollection(
                pb.CreateCollectionRequest(
                    collection_id="m", collection=pb.Collection(embedding_model="bge-large")
                ),
                metadata=md,
            ),
        )
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            search.CreateCollection(
                pb.CreateCollectionRequest(
                    collection_id="d", collection=pb.Collection(dimension=768)
                ),
                metadata=md,
            ),
        )
        error = await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            search.UpsertDocuments(
                pb.UpsertDocumentsRequest(
                    parent="collections/bad",
                    documents=[
                        doc("bad", "a", "one"),
                        doc("bad", "b", "two"),
                        doc("bad", "a", "three"),
                    ],
                ),
                metadata=md,
            ),
        )
        assert (error.details() or "").endswith("repeat within the batch: a")
        listed = await search.ListDocuments(
            pb.ListDocumentsRequest(parent="collections/bad"), metadata=md
        )
        assert list(listed.documents) == [], "a refused batch writes nothing"
        await expect(
            grpc.StatusCode.NOT_FOUND,
            search.GetDocument(
                pb.GetDocumentRequest(name="collections/bad/documents/zz"), metadata=md
            ),
        )


async def test_long_text_is_truncated_for_embedding_and_flagged(
    search_server: Running, token: str
) -> None:
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, "long")
        long_text = " ".join(f"word{i}" for i in range(1500))
        reply = await search.UpsertDocuments(
            pb.UpsertDocumentsRequest(
                parent="collections/long",
                documents=[doc("long", "l", long_text), doc("long", "s", "short text")],
            ),
            metadata=bearer(token),
        )
        flags = {d.name.rsplit("/", 1)[1]: d.text_truncated for d in reply.documents}
        assert flags == {"l": True, "s": False}
        assert (
            await search.GetDocument(
                pb.GetDocumentRequest(name="collections/long/documents/l"), metadata=bearer(token)
            )
        ).document.text == long_text
        found = await search.Search(
            pb.SearchRequest(parent="collections/long", query=long_text[:4000], top_k=1),
            metadata=bearer(token),
        )
        assert found.query_truncated and found.results[0].document.endswith("/l")


def brute_force(
    encoder: Encoder, texts: dict[str, str], query: str, allowed: set[str], k: int
) -> list[str]:
    names = sorted(allowed)
    vectors = encoder.encode([texts[n] for n in names]).vectors
    scores = vectors @ encoder.encode([query]).vectors[0]
    return [names[i] for i in np.argsort(-scores)[:k]]


@pytest.mark.parametrize("size", [60, 1100])  # exact index, then an IVF index
async def test_filters_match_brute_force(
    search_server: Running, token: str, encoder: Encoder, size: int
) -> None:
    name = f"filtered{size}"
    topics = ["astronomy", "cooking", "music", "sports", "medicine", "law", "finance"]
    texts = {
        f"d{i}": f"Note {i} about {topics[i % 7]} and item {i * 7919 % 1000}" for i in range(size)
    }
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, name)
        items = list(texts.items())
        for start in range(0, size, 256):
            await search.UpsertDocuments(
                pb.UpsertDocumentsRequest(
                    parent=f"collections/{name}",
                    documents=[
                        doc(name, k, v, group=int(k[1:]) % 5, even=int(k[1:]) % 2 == 0)
                        for k, v in items[start : start + 256]
                    ],
                ),
                metadata=bearer(token),
            )
        info = await search.GetCollection(
            pb.GetCollectionRequest(name=f"collections/{name}"), metadata=bearer(token)
        )
        assert info.collection.index_type == (
            pb.INDEX_TYPE_APPROXIMATE if size > 1000 else pb.INDEX_TYPE_EXACT
        )
        group = struct_pb2.Value(number_value=3)
        conditions = [
            pb.MetadataCondition(key="group", equals=group),
            pb.MetadataCondition(key="even", equals=struct_pb2.Value(bool_value=False)),
        ]
        query = "cooking recipes"
        reply = await search.Search(
            pb.SearchRequest(
                parent=f"collections/{name}",
                query=query,
                top_k=10,
                filter=pb.MetadataFilter(conditions=conditions),
            ),
            metadata=bearer(token),
        )
        allowed = {k for k in texts if int(k[1:]) % 5 == 3 and int(k[1:]) % 2 == 1}
        expected = brute_force(encoder, texts, query, allowed, 10)
        assert [r.document.rsplit("/", 1)[1] for r in reply.results] == expected
        ranged = await search.Search(
            pb.SearchRequest(
                parent=f"collections/{name}",
                query=query,
                top_k=10,
                filter=pb.MetadataFilter(
                    conditions=[
                        pb.MetadataCondition(key="group", range=pb.NumberRange(min=1, max=2))
                    ]
                ),
            ),
            metadata=bearer(token),
        )
        allowed = {k for k in texts if 1 <= int(k[1:]) % 5 <= 2}
        assert [r.document.rsplit("/", 1)[1] for r in ranged.results] == brute_force(
            encoder, texts, query, allowed, 10
        )


async def test_restart_serves_the_same_results(
    search_env: dict[str, str], new_database: Any, token: str
) -> None:
    first = await start_server([SPEC], new_database, extra_env=search_env)
    environ = {k: v for k, v in first.environ.items() if k.startswith("AIMESH_")}
    try:
        channel, search = stub(first)
        async with channel:
            await make_collection(search, token, "kept")
            await search.UpsertDocuments(
                pb.UpsertDocumentsRequest(
                    parent="collections/kept",
                    documents=[doc("kept", k, v) for k, v in ANIMALS.items()],
                ),
                metadata=bearer(token),
            )
            await search.DeleteDocument(
                pb.DeleteDocumentRequest(name="collections/kept/documents/dog"),
                metadata=bearer(token),
            )
            before = await search.Search(
                pb.SearchRequest(parent="collections/kept", query="pets", top_k=5),
                metadata=bearer(token),
            )
    finally:
        await first.server.stop(0.5)
    second = await start_server([SPEC], new_database, extra_env=environ)
    try:
        channel, search = stub(second)
        async with channel:
            after = await search.Search(
                pb.SearchRequest(parent="collections/kept", query="pets", top_k=5),
                metadata=bearer(token),
            )
    finally:
        await second.server.stop(0.5)
    assert [(r.document, round(r.score, 5)) for r in after.results] == [
        (r.document, round(r.score, 5)) for r in before.results
    ]
    assert all(not r.document.endswith("/dog") for r in after.results)


async def test_concurrent_upserts_searches_and_deletes(search_server: Running, token: str) -> None:
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, "busy")
        md = bearer(token)
        deleted: set[str] = set()
        errors: list[BaseException] = []

        async def writer(worker: int) -> None:
            for round_ in range(6):
                ids = [f"w{worker}-{round_}-{j}" for j in range(4)]
                await search.UpsertDocuments(
                    pb.UpsertDocumentsRequest(
                        parent="collections/busy",
                        documents=[doc("busy", i, f"worker {worker} writes note {i}") for i in ids],
                    ),
                    metadata=md,
                )
                await search.DeleteDocument(
                    pb.DeleteDocumentRequest(name=f"collections/busy/documents/{ids[0]}"),
                    metadata=md,
                )
                deleted.add(f"collections/busy/documents/{ids[0]}")

        async def reader() -> None:
            for _ in range(15):
                gone = set(deleted)  # deleted before this search began
                reply = await search.Search(
                    pb.SearchRequest(
                        parent="collections/busy", query="worker writes note", top_k=20
                    ),
                    metadata=md,
                )
                returned = {r.document for r in reply.results}
                assert not returned & gone, returned & gone

        tasks = [writer(w) for w in range(3)] + [reader() for _ in range(3)]
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                errors.append(result)
        assert not errors, errors
        listed = await search.ListDocuments(
            pb.ListDocumentsRequest(parent="collections/busy", page_size=500), metadata=md
        )
        assert len(listed.documents) == 3 * 6 * 3


def jsonl(count: int, bad_every: int = 0) -> bytes:
    lines = []
    for i in range(count):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append("{not json")
        else:
            lines.append(
                json.dumps(
                    {"id": f"i{i}", "text": f"imported passage number {i}", "metadata": {"n": i}}
                )
            )
    return ("\n".join(lines) + "\n").encode()


async def feed(
    search: Any, token: str, job: str, data: bytes, offset: int, gate: asyncio.Event | None = None
) -> Any:
    async def requests() -> AsyncIterator[pb.ImportDocumentsRequest]:
        yield pb.ImportDocumentsRequest(
            target=pb.ImportTarget(import_job=job, offset=offset, total_bytes=len(data))
        )
        for start in range(offset, len(data), 997):  # chunks that split lines
            if gate is not None and start - offset > len(data) // 3:
                await gate.wait()
            yield pb.ImportDocumentsRequest(chunk=data[start : start + 997])

    return await search.ImportDocuments(requests(), metadata=bearer(token))


async def test_import_is_cancelled_then_resumed_without_loss(
    search_server: Running, token: str
) -> None:
    data = jsonl(300, bad_every=50)
    job = "collections/imports/importJobs/first"
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, "imports")
        gate = asyncio.Event()
        stream = asyncio.ensure_future(feed(search, token, job, data, 0, gate))
        for _ in range(200):
            await asyncio.sleep(0.05)
            try:
                state = (
                    await search.GetImportJob(
                        pb.GetImportJobRequest(name=job), metadata=bearer(token)
                    )
                ).import_job
            except grpc.aio.AioRpcError as error:  # the stream has not named the job yet
                assert error.code() == grpc.StatusCode.NOT_FOUND
                continue
            if state.committed_lines > 0:
                break
        cancelled = await search.CancelImportJob(
            pb.CancelImportJobRequest(name=job), metadata=bearer(token)
        )
        assert cancelled.import_job.state == pb.IMPORT_JOB_STATE_CANCELLED
        gate.set()
        stopped = (await stream).import_job
        assert stopped.state == pb.IMPORT_JOB_STATE_CANCELLED
        assert 0 < stopped.committed_bytes < len(data)
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            feed(search, token, job, data, stopped.committed_bytes + 1),
        )
        resumed = (await feed(search, token, job, data, stopped.committed_bytes)).import_job
        assert resumed.state == pb.IMPORT_JOB_STATE_SUCCEEDED
        assert resumed.committed_bytes == len(data) and resumed.committed_lines == 300
        assert resumed.failed_lines == 6 and resumed.line_errors[0].line == 50
        listed = await search.ListDocuments(
            pb.ListDocumentsRequest(parent="collections/imports", page_size=500),
            metadata=bearer(token),
        )
        assert len(listed.documents) == 294
        await expect(grpc.StatusCode.FAILED_PRECONDITION, feed(search, token, job, data, len(data)))


async def test_a_deeply_nested_line_is_one_line_error_not_a_failed_job(
    search_server: Running, token: str
) -> None:
    deep = b'{"id": "deep", "text": "t", "metadata": {"k": ' + b"[" * 100_000 + b"}}\n"
    data = jsonl(3) + deep + jsonl(1).replace(b'"i0"', b'"last"')
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, "nested")
        job = (await feed(search, token, "collections/nested/importJobs/deep", data, 0)).import_job
    assert job.state == pb.IMPORT_JOB_STATE_SUCCEEDED
    assert (job.committed_lines, job.failed_lines) == (5, 1)
    assert job.line_errors[0].line == 4 and "nested" in job.line_errors[0].message


async def test_a_batch_full_of_bad_documents_is_still_invalid_argument(
    search_server: Running, token: str
) -> None:
    channel, search = stub(search_server)
    async with channel:
        documents = [
            pb.Document(name=f"collections/other/documents/{i}", text="") for i in range(256)
        ]
        error = await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            search.UpsertDocuments(
                pb.UpsertDocumentsRequest(parent="collections/x", documents=documents),
                metadata=bearer(token),
            ),
        )
    assert "more" in (error.details() or "") and len(error.details() or "") < 1000


async def test_an_empty_range_is_invalid_argument(search_server: Running, token: str) -> None:
    channel, search = stub(search_server)
    async with channel:
        await make_collection(search, token, "ranges")
        condition = pb.MetadataCondition(key="n", range=pb.NumberRange(min=5, max=1))
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            search.Search(
                pb.SearchRequest(
                    parent="collections/ranges",
                    query="anything",
                    top_k=3,
                    filter=pb.MetadataFilter(conditions=[condition]),
                ),
                metadata=bearer(token),
            ),
        )
