"""SearchService: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format

from aimesh.search.v1 import search_service_pb2 as pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh_runtime.auth import Principal
from aimesh_runtime.context import principal as caller
from aimesh_runtime.errors import InvalidArgument, PermissionDenied
from aimesh_runtime.ownership import is_service_account
from aimesh_runtime.pages import struct, timestamp
from aimesh_search import filters
from aimesh_search.catalog import Catalog, DocumentInput, Query, SearchAnswer
from aimesh_search.importer import Importer, ImportTarget
from aimesh_search.reserved import ReservedCollections
from aimesh_search.store import CollectionRow, DocumentRow, ImportJobRow

UPDATABLE_COLLECTION_FIELDS = frozenset({"display_name", "visibility"})


def _collection_id(name: str) -> str:
    return name.removeprefix("collections/")


def _document_name(name: str) -> tuple[str, str]:
    collection, _, document = name.removeprefix("collections/").partition("/documents/")
    return collection, document


def collection_proto(row: CollectionRow, catalog: Catalog) -> pb.Collection:
    approximate = catalog.is_approximate(row.id)
    return pb.Collection(
        name=f"collections/{row.id}",
        display_name=row.display_name,
        embedding_model=row.embedding_model,
        dimension=row.dimension,
        max_input_tokens=row.max_input_tokens,
        document_count=row.document_count,
        index_type=pb.INDEX_TYPE_APPROXIMATE if approximate else pb.INDEX_TYPE_EXACT,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        owner=row.owner,
        visibility=pb.Visibility.Value(f"VISIBILITY_{row.visibility}"),
    )


def document_proto(row: DocumentRow) -> pb.Document:
    return pb.Document(
        name=f"collections/{row.collection_id}/documents/{row.id}",
        text=row.text,
        metadata=struct(row.metadata),
        owner=row.owner,
        text_truncated=row.text_truncated,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def import_job_proto(row: ImportJobRow) -> pb.ImportJob:
    return pb.ImportJob(
        name=f"collections/{row.collection_id}/importJobs/{row.id}",
        display_name=row.display_name,
        state=pb.ImportJobState.Value(f"IMPORT_JOB_STATE_{row.state}"),
        total_bytes=row.total_bytes,
        committed_bytes=row.committed_bytes,
        committed_lines=row.committed_lines,
        upserted_documents=row.upserted_documents,
        truncated_documents=row.truncated_documents,
        failed_lines=row.failed_lines,
        line_errors=[
            pb.ImportLineError(line=e["line"], message=e["message"]) for e in row.line_errors
        ],
        error_message=row.error_message,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        end_time=timestamp(row.end_time),
    )


def _condition(condition: pb.MetadataCondition) -> filters.Condition:
    test = condition.WhichOneof("test")
    if test == "equals":
        return filters.Equals(condition.key, json_format.MessageToDict(condition.equals))
    if test == "any_of":
        values = tuple(json_format.MessageToDict(v) for v in condition.any_of.values)
        return filters.AnyOf(condition.key, values)
    if test == "range":
        bounds = condition.range
        return filters.Range(
            condition.key,
            bounds.min if bounds.HasField("min") else None,
            bounds.max if bounds.HasField("max") else None,
        )
    # protovalidate requires the oneof; this is for a caller that skipped it.
    raise InvalidArgument.field("filter.conditions", "a condition needs equals, any_of or range")


def _query(request: pb.SearchRequest) -> Query:
    return Query(
        text=request.query,
        top_k=request.top_k,
        conditions=tuple(_condition(c) for c in request.filter.conditions),
        min_score=request.min_score if request.HasField("min_score") else None,
    )


def _response(answer: SearchAnswer) -> pb.SearchResponse:
    return pb.SearchResponse(
        results=[
            pb.SearchResult(
                document=f"collections/{h.document.collection_id}/documents/{h.document.id}",
                score=h.score,
                text=h.document.text,
                metadata=struct(h.document.metadata),
            )
            for h in answer.hits
        ],
        query_truncated=answer.query_truncated,
    )


async def _chunks(requests: AsyncIterator[pb.ImportDocumentsRequest]) -> AsyncIterator[bytes]:
    async for message in requests:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument.field("target", "only the first message names the job")
        yield message.chunk


def _owner(requested: str) -> str:
    """A document's owner: the caller unless an admin names someone else."""
    me = f"users/{caller().subject}"
    if requested and requested != me and "search.admin" not in caller().scopes:
        raise PermissionDenied(
            "only admins may write documents owned by others", reason="NOT_OWNER"
        )
    return requested or me


def _visible_to(principal: Principal) -> str | None:
    """Whose collections a list shows besides the shared ones; None: all of them."""
    if "search.admin" in principal.scopes or is_service_account(principal):
        return None
    return f"users/{principal.subject}"


class SearchServicer(search_service_pb2_grpc.SearchServiceServicer):
    def __init__(self, catalog: Catalog, importer: Importer, reserved: ReservedCollections) -> None:
        self._catalog = catalog
        self._importer = importer
        self._reserved = reserved

    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCollectionResponse:
        self._reserved.check_create(request.collection_id, caller())
        c = request.collection
        shared = c.visibility == pb.VISIBILITY_ORGANISATION
        row = await self._catalog.create_collection(
            request.collection_id,
            c.display_name,
            c.embedding_model,
            c.dimension,
            owner=f"users/{caller().subject}",
            visibility="ORGANISATION" if shared else "PRIVATE",
        )
        return pb.CreateCollectionResponse(collection=collection_proto(row, self._catalog))

    async def GetCollection(
        self, request: pb.GetCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionResponse:
        row = await self._catalog.get_collection(_collection_id(request.name))
        return pb.GetCollectionResponse(collection=collection_proto(row, self._catalog))

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        rows, token = await self._catalog.list_collections(
            request.page_size, request.page_token, _visible_to(caller())
        )
        return pb.ListCollectionsResponse(
            collections=[collection_proto(r, self._catalog) for r in rows], next_page_token=token
        )

    async def UpdateCollection(
        self, request: pb.UpdateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateCollectionResponse:
        c, paths = request.collection, set(request.update_mask.paths)
        unknown = sorted(paths - UPDATABLE_COLLECTION_FIELDS)
        if unknown or not paths:
            raise InvalidArgument.field(
                "update_mask", f"can change only {', '.join(sorted(UPDATABLE_COLLECTION_FIELDS))}"
            )
        visibility = None
        if "visibility" in paths:
            shared = c.visibility == pb.VISIBILITY_ORGANISATION
            visibility = "ORGANISATION" if shared else "PRIVATE"
        row = await self._catalog.update_collection(
            _collection_id(c.name),
            c.display_name if "display_name" in paths else None,
            visibility,
        )
        return pb.UpdateCollectionResponse(collection=collection_proto(row, self._catalog))

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        await self._catalog.delete_collection(_collection_id(request.name))
        return pb.DeleteCollectionResponse()

    async def UpsertDocuments(
        self, request: pb.UpsertDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpsertDocumentsResponse:
        documents = [
            DocumentInput(
                id=_document_name(d.name)[1],
                text=d.text,
                metadata=json_format.MessageToDict(d.metadata),
                owner=_owner(d.owner),
            )
            for d in request.documents
        ]
        rows = await self._catalog.upsert(_collection_id(request.parent), documents)
        return pb.UpsertDocumentsResponse(documents=[document_proto(r) for r in rows])

    async def GetDocument(
        self, request: pb.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDocumentResponse:
        row = await self._catalog.get_document(*_document_name(request.name))
        return pb.GetDocumentResponse(document=document_proto(row))

    async def ListDocuments(
        self, request: pb.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDocumentsResponse:
        rows, token = await self._catalog.list_documents(
            _collection_id(request.parent), request.page_size, request.page_token
        )
        return pb.ListDocumentsResponse(
            documents=[document_proto(r) for r in rows], next_page_token=token
        )

    async def DeleteDocument(
        self, request: pb.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDocumentResponse:
        await self._catalog.delete_document(*_document_name(request.name))
        return pb.DeleteDocumentResponse()

    async def Search(
        self, request: pb.SearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchResponse:
        answers = await self._catalog.search(_collection_id(request.parent), [_query(request)])
        return _response(answers[0])

    async def BatchSearch(
        self, request: pb.BatchSearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchSearchResponse:
        answers = await self._catalog.search(
            _collection_id(request.parent), [_query(r) for r in request.requests]
        )
        return pb.BatchSearchResponse(responses=[_response(a) for a in answers])

    async def ImportDocuments(
        self,
        request_iterator: AsyncIterator[pb.ImportDocumentsRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.ImportDocumentsResponse:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("part") != "target":
            raise InvalidArgument.field("target", "the first message must name the import job")
        target = first.target
        job = await self._importer.run(
            ImportTarget(target.import_job, target.display_name, target.total_bytes, target.offset),
            _chunks(request_iterator),
            f"users/{caller().subject}",
            "search.admin" in caller().scopes,
        )
        return pb.ImportDocumentsResponse(import_job=import_job_proto(job))

    async def GetImportJob(
        self, request: pb.GetImportJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetImportJobResponse:
        return pb.GetImportJobResponse(import_job=import_job_proto(await self._job(request.name)))

    async def ListImportJobs(
        self, request: pb.ListImportJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListImportJobsResponse:
        rows, token = await self._importer.list_jobs(
            _collection_id(request.parent), request.page_size, request.page_token
        )
        return pb.ListImportJobsResponse(
            import_jobs=[import_job_proto(r) for r in rows], next_page_token=token
        )

    async def CancelImportJob(
        self, request: pb.CancelImportJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelImportJobResponse:
        collection_id, job_id = self._job_key(request.name)
        row = await self._importer.cancel(collection_id, job_id)
        return pb.CancelImportJobResponse(import_job=import_job_proto(row))

    async def PurgeUserData(
        self, request: pb.PurgeUserDataRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurgeUserDataResponse:
        return pb.PurgeUserDataResponse(
            deleted_documents=await self._catalog.purge_owner(request.user)
        )

    @staticmethod
    def _job_key(name: str) -> tuple[str, str]:
        collection_id, _, job_id = name.removeprefix("collections/").partition("/importJobs/")
        return collection_id, job_id

    async def _job(self, name: str) -> ImportJobRow:
        return await self._importer.get(*self._job_key(name))
