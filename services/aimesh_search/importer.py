"""Bulk import of JSONL, streamed in chunks, committed in batches, resumable.

The file is never held whole: the importer keeps the unfinished tail of the
last chunk and one batch of parsed lines. Each batch is embedded and written
with the job's progress (bytes and lines consumed) in one transaction, so a
job that stops for any reason resumes from `committed_bytes` with no line
lost or applied twice. Cancelling marks the job CANCELLED; the feeding stream
sees it at its next batch and stops without committing that batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aimesh_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from aimesh_runtime.pages import cut_page, encode_page_token, page_size
from aimesh_search.batcher import EncoderBatcher
from aimesh_search.catalog import Catalog, DocumentInput, decode_after
from aimesh_search.store import ImportJobRow, SearchStore

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 20
DOCUMENT_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~-")
MAX_TEXT = 16_384
MAX_DEPTH = 32  # the line's object counts as 1; metadata nests at most 31 deep


@dataclass(frozen=True)
class ImportTarget:
    """The job a stream feeds, as its first message names it."""

    import_job: str  # collections/{collection}/importJobs/{job}
    display_name: str
    total_bytes: int  # 0 when unknown
    offset: int  # the byte this stream starts at: the job's committed_bytes


def parse_line(raw: bytes, default_owner: str, may_assign_owner: bool = False) -> DocumentInput:
    """One JSONL line as a document, or ValueError saying what is wrong."""
    too_deep = f"nested more than {MAX_DEPTH} levels deep"
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    except RecursionError:  # the decoder's own limit, long before our bound is checked
        raise ValueError(too_deep) from None
    if nesting_depth(entry) > MAX_DEPTH:
        raise ValueError(too_deep)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    doc_id, text = entry.get("id"), entry.get("text")
    metadata, owner = entry.get("metadata", {}), entry.get("owner") or default_owner
    if (
        not isinstance(doc_id, str)
        or not 1 <= len(doc_id) <= 128
        or not set(doc_id) <= DOCUMENT_ID_CHARS
    ):
        raise ValueError("id must be 1 to 128 characters of A-Z a-z 0-9 . _ ~ -")
    if not doc_id[0].isalnum():
        raise ValueError("id must start with a letter or digit")
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_TEXT:
        raise ValueError(f"text must be a string of 1 to {MAX_TEXT} characters")
    if not isinstance(metadata, dict) or len(metadata) > 64:
        raise ValueError("metadata must be an object with at most 64 keys")
    if not isinstance(owner, str) or (owner and not owner.startswith("users/")):
        raise ValueError("owner must be users/{user}")
    if owner != default_owner and not may_assign_owner:
        raise ValueError("only admins may import documents owned by others")
    return DocumentInput(doc_id, text, metadata, owner)


def nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value; without
    recursion, so a deep value cannot exhaust the stack here either."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        current, depth = pending.pop()
        if not isinstance(current, dict | list):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:  # deeper is refused anyway: stop looking there
            children = current.values() if isinstance(current, dict) else current
            pending.extend((child, depth + 1) for child in children)
    return deepest


class Importer:
    def __init__(
        self, store: SearchStore, catalog: Catalog, batcher: EncoderBatcher, batch_lines: int
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._batcher = batcher
        self._batch_lines = batch_lines

    async def run(
        self,
        target: ImportTarget,
        chunks: AsyncIterator[bytes],
        owner: str,
        may_assign_owner: bool = False,
    ) -> ImportJobRow:
        """Feed the job from `chunks`, the file's bytes from `target.offset` on."""
        collection_id, _, job_id = target.import_job.removeprefix("collections/").partition(
            "/importJobs/"
        )
        await self._catalog.get_collection(collection_id)  # NOT_FOUND before any claim
        feeder = uuid.uuid4().hex
        job = await self._store.claim_import_job(
            collection_id, job_id, target.display_name, target.total_bytes, feeder
        )
        if job.state != "RUNNING" or job.feeder != feeder:
            raise FailedPrecondition(
                f"{target.import_job} is {job.state}"
                + ("; another stream feeds it" if job.state == "RUNNING" else ""),
                reason="IMPORT_JOB_NOT_RESUMABLE",
                metadata={"state": job.state},
            )
        if target.offset != job.committed_bytes:
            await self._store.finish_import_job(collection_id, job_id, "INTERRUPTED")
            raise FailedPrecondition(
                f"resume from byte {job.committed_bytes}, not {target.offset}",
                reason="IMPORT_OFFSET_MISMATCH",
                metadata={"committed_bytes": str(job.committed_bytes)},
            )
        try:
            return await self._feed(job, chunks, owner, may_assign_owner)
        except asyncio.CancelledError:
            # The client went away: leave the job resumable.
            await asyncio.shield(
                self._store.finish_import_job(collection_id, job_id, "INTERRUPTED")
            )
            raise
        except InvalidArgument:
            await self._store.finish_import_job(collection_id, job_id, "INTERRUPTED")
            raise
        except Exception as error:
            log.exception("import %s failed", target.import_job)
            await self._store.finish_import_job(collection_id, job_id, "FAILED", str(error)[:500])
            raise

    async def _feed(
        self,
        job: ImportJobRow,
        chunks: AsyncIterator[bytes],
        owner: str,
        may_assign_owner: bool,
    ) -> ImportJobRow:
        position = job.committed_bytes  # file offset just past the last whole line read
        line_number = job.committed_lines
        tail = b""
        batch: list[DocumentInput] = []
        failed: list[dict[str, Any]] = []
        lines_in_batch = 0

        async def commit() -> bool:
            nonlocal batch, failed, lines_in_batch
            if not lines_in_batch:
                return True
            state = await self._commit(job, batch, failed, position, lines_in_batch)
            batch, failed, lines_in_batch = [], [], 0
            return state == "RUNNING"

        def take(raw: bytes) -> None:
            nonlocal line_number, lines_in_batch
            line_number += 1
            lines_in_batch += 1
            if not raw.strip():
                return
            try:
                document = parse_line(raw, owner, may_assign_owner)
            except Exception as error:  # one bad line never fails the whole job
                if not isinstance(error, ValueError):
                    log.warning("import line %d: %r", line_number, error)
                    error = ValueError(f"unreadable line ({type(error).__name__})")
                failed.append({"line": line_number, "message": str(error)[:500]})
                return
            # A later line with the same id replaces the earlier one in this batch too.
            batch[:] = [d for d in batch if d.id != document.id]
            batch.append(document)

        async for chunk in chunks:
            tail += chunk
            while (newline := tail.find(b"\n")) >= 0:
                raw, tail = tail[:newline], tail[newline + 1 :]
                position += newline + 1
                take(raw)
                if lines_in_batch >= self._batch_lines and not await commit():
                    return await self._current(job)
            if len(tail) > MAX_LINE_BYTES:
                raise InvalidArgument.field(
                    "chunk", f"line {line_number + 1} is longer than {MAX_LINE_BYTES} bytes"
                )
        if tail:  # a last line without a newline
            position += len(tail)
            take(tail)
        if not await commit():
            return await self._current(job)
        finished = job.total_bytes == 0 or position >= job.total_bytes
        return await self._store.finish_import_job(
            job.collection_id, job.id, "SUCCEEDED" if finished else "INTERRUPTED"
        )

    async def _commit(
        self,
        job: ImportJobRow,
        documents: list[DocumentInput],
        failed: list[dict[str, Any]],
        position: int,
        lines: int,
    ) -> str:
        state = "RUNNING"
        if documents:
            encoded = await self._batcher.encode_bulk([d.text for d in documents])

            async def write(new: Any) -> Any:
                nonlocal state
                stored, state = await self._store.commit_import_batch(
                    job, new, position, lines, failed
                )
                return stored

            await self._catalog.store_encoded(
                job.collection_id, documents, encoded.vectors, encoded.truncated, commit=write
            )
        else:
            _, state = await self._store.commit_import_batch(job, [], position, lines, failed)
        return state

    async def get(self, collection_id: str, job_id: str) -> ImportJobRow:
        await self._catalog.get_collection(collection_id)
        job = await self._store.import_job(collection_id, job_id)
        if job is None:
            name = f"collections/{collection_id}/importJobs/{job_id}"
            raise NotFound(f"{name} does not exist", metadata={"name": name})
        return job

    async def list_jobs(
        self, collection_id: str, size: int, token: str
    ) -> tuple[list[ImportJobRow], str]:
        await self._catalog.get_collection(collection_id)
        limit = page_size(size)
        rows = await self._store.import_jobs(collection_id, decode_after(token), limit + 1)
        return cut_page(rows, limit, lambda row: encode_page_token(row.id))

    async def cancel(self, collection_id: str, job_id: str) -> ImportJobRow:
        await self.get(collection_id, job_id)
        job = await self._store.cancel_import_job(collection_id, job_id)
        assert job is not None
        return job

    async def _current(self, job: ImportJobRow) -> ImportJobRow:
        found = await self._store.import_job(job.collection_id, job.id)
        if found is None:
            raise NotFound(f"collections/{job.collection_id}/importJobs/{job.id} was deleted")
        return found
