"""`aimesh search import FILE` and `aimesh search query TEXT`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc

from aimesh.search.v1 import search_service_pb2 as pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh_cli import local

CHUNK_BYTES = 256 * 1024


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    search = commands.add_parser(
        "search", help="import documents into and query the search service"
    )
    search.add_argument("--target", help="host:port of the search service")
    search.add_argument("--host", default="127.0.0.1")
    search.add_argument("--monolith", action="store_true")
    search.add_argument("--token", help="access token (default: $AIMESH_TOKEN, else the dev admin)")
    actions = search.add_subparsers(dest="action", required=True)
    importing = actions.add_parser("import", help="stream a JSONL file in, with a progress bar")
    importing.add_argument("file", type=Path, help='lines of {"id", "text", "metadata", "owner"}')
    importing.add_argument("--collection", required=True, help="created if missing")
    importing.add_argument("--job", help="import job id; the same id resumes an interrupted import")
    importing.set_defaults(run=_reporting(_import))
    query = actions.add_parser("query", help="search a collection and print a table")
    query.add_argument("text")
    query.add_argument("--collection", required=True)
    query.add_argument("--top-k", type=int, default=10)
    query.set_defaults(run=_reporting(_query))


def _target(args: argparse.Namespace) -> str:
    return str(
        args.target or f"{args.host}:{local.grpc_port('monolith' if args.monolith else 'search')}"
    )


def _reporting(
    action: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    """Run `action`, turning an RPC error into one line and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(action(args))
        except grpc.aio.AioRpcError as error:
            print(f"aimesh: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1

    return run


async def _import(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # a dependency of sentence-transformers

    metadata = (
        (
            "authorization",
            f"Bearer {await local.caller_token(args.token, args.host, args.monolith)}",
        ),
    )
    size = args.file.stat().st_size
    job_name = f"collections/{args.collection}/importJobs/{args.job or uuid.uuid4().hex[:16]}"
    async with grpc.aio.insecure_channel(_target(args)) as channel:
        search = search_service_pb2_grpc.SearchServiceStub(channel)
        try:
            await search.CreateCollection(
                pb.CreateCollectionRequest(
                    collection_id=args.collection, collection=pb.Collection()
                ),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        offset = 0
        try:
            job = await search.GetImportJob(
                pb.GetImportJobRequest(name=job_name), metadata=metadata
            )
            offset = job.import_job.committed_bytes  # resume where it stopped
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        bar = tqdm(
            total=size, initial=offset, unit="B", unit_scale=True, desc=job_name.rsplit("/", 1)[1]
        )

        async def requests() -> AsyncIterator[pb.ImportDocumentsRequest]:
            yield pb.ImportDocumentsRequest(
                target=pb.ImportTarget(import_job=job_name, offset=offset, total_bytes=size)
            )
            with args.file.open("rb") as source:
                source.seek(offset)
                while chunk := source.read(CHUNK_BYTES):
                    yield pb.ImportDocumentsRequest(chunk=chunk)

        call = search.ImportDocuments(requests(), metadata=metadata)
        watch = asyncio.ensure_future(_follow(search, job_name, metadata, bar))
        try:
            reply = await call
        finally:
            watch.cancel()
        bar.n = reply.import_job.committed_bytes
        bar.close()
    job = reply.import_job
    print(
        f"{job.name}: {pb.ImportJobState.Name(job.state).removeprefix('IMPORT_JOB_STATE_')}, "
        f"{job.upserted_documents} documents, {job.failed_lines} bad lines, "
        f"{job.truncated_documents} truncated for embedding"
    )
    for line_error in job.line_errors[:10]:
        print(f"  line {line_error.line}: {line_error.message}", file=sys.stderr)
    return 0 if job.state == pb.IMPORT_JOB_STATE_SUCCEEDED else 1


async def _follow(
    search: search_service_pb2_grpc.SearchServiceStub,
    name: str,
    metadata: tuple[tuple[str, str], ...],
    bar: object,
) -> None:
    """Move the progress bar as the service commits batches."""
    while True:
        await asyncio.sleep(0.5)
        try:
            job = await search.GetImportJob(pb.GetImportJobRequest(name=name), metadata=metadata)
        except grpc.aio.AioRpcError:
            continue
        bar.n = job.import_job.committed_bytes  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]


async def _query(args: argparse.Namespace) -> int:
    metadata = (
        (
            "authorization",
            f"Bearer {await local.caller_token(args.token, args.host, args.monolith)}",
        ),
    )
    async with grpc.aio.insecure_channel(_target(args)) as channel:
        search = search_service_pb2_grpc.SearchServiceStub(channel)
        started = time.perf_counter()
        reply = await search.Search(
            pb.SearchRequest(
                parent=f"collections/{args.collection}", query=args.text, top_k=args.top_k
            ),
            metadata=metadata,
            timeout=30,
        )
        elapsed = (time.perf_counter() - started) * 1000
    width = max(
        20,
        min(100, os.get_terminal_size(sys.stdout.fileno()).columns - 40)
        if sys.stdout.isatty()
        else 80,
    )
    print(f"{'score':>6}  {'document':<28}  text")
    for result in reply.results:
        document = result.document.rsplit("/", 1)[1]
        text = " ".join(result.text.split())
        print(f"{result.score:6.3f}  {document[:28]:<28}  {text[:width]}")
    note = "; query truncated to the model's window" if reply.query_truncated else ""
    print(f"{len(reply.results)} results in {elapsed:.0f} ms{note}", file=sys.stderr)
    return 0
