"""FAISS index of one collection: exact while small, HNSW once large, stable ids.

Each document has a stable 64-bit vector id (its row's `vector_id`), so
upserts replace and deletes remove by id. Below `ann_threshold` vectors the
index is an exact inner-product scan (IndexIDMap2 over IndexFlatIP: vectors
are unit length, so this is cosine similarity). At the threshold it is rebuilt
as an HNSW graph (IndexHNSWFlat, M=32). HNSW was chosen over IVF on measured
figures: on 100,000 real docstring embeddings IVF never reached recall@10 0.95
while 10x faster than exact search (0.947 at 12x, 0.953 at 8x), HNSW gave 0.974
at 53x (efSearch 64). HNSW cannot remove points, so a delete or a replaced
vector leaves a tombstone that searches exclude with an IDSelector; the graph
is rebuilt without them once they pass a quarter of it.

Filters are exact: the vectors of the matching documents are scored by brute
force, so a filtered search returns the same top_k as a scan of the matching
documents (no graph walk that a selective filter could starve).

All FAISS calls for one collection run on one worker thread: mutations and
searches never overlap (FAISS indexes are not safe to mutate while searched),
and the event loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)
T = TypeVar("T")
# faiss's SWIG stubs describe C++ overloads the Python wrappers do not follow.
faiss: Any = importlib.import_module("faiss")

Ids = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
COMPACT_AT = 0.25  # rebuild the graph when this share of its points are tombstones


def gpu_count() -> int:
    counter = getattr(faiss, "get_num_gpus", None)
    return int(counter()) if counter is not None else 0


def _limit_search_threads(threads: int) -> None:
    # OpenMP's thread count is per calling thread: set it in the index's own.
    # Its workers spin between searches, taking cores from the encoder copies.
    if threads > 0:
        faiss.omp_set_num_threads(threads)


class VectorIndex:
    def __init__(
        self,
        dimension: int,
        *,
        ann_threshold: int,
        ef_search: int,
        use_gpu: bool = False,
        search_threads: int = 1,
    ) -> None:
        self.dimension = dimension
        self._ann_threshold = ann_threshold
        self._ef_search = ef_search
        self._flat: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._flat_ids: set[int] = set()
        # HNSW state: graph points are numbered 0.. in insertion order.
        self._hnsw: Any = None
        self._external = np.zeros(0, dtype=np.int64)  # point -> vector id
        self._point: dict[int, int] = {}  # live vector id -> point
        self._dead: set[int] = set()  # tombstoned points
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="faiss",
            initializer=_limit_search_threads,
            initargs=(search_threads,),
        )
        # A GPU copy of the exact index serves its searches; the CPU index stays the
        # source of truth and the copy is refreshed after writes.
        self._gpu = use_gpu and gpu_count() > 0
        self._gpu_resources = faiss.StandardGpuResources() if self._gpu else None
        self._gpu_index: Any = None

    @property
    def approximate(self) -> bool:
        return self._hnsw is not None

    @property
    def size(self) -> int:
        return len(self._point) if self.approximate else len(self._flat_ids)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def upsert(self, ids: Sequence[int], vectors: Matrix) -> None:
        await self._run(self._upsert, np.asarray(ids, dtype=np.int64), vectors)

    async def remove(self, ids: Sequence[int]) -> None:
        if ids:
            await self._run(self._remove, np.asarray(ids, dtype=np.int64))

    async def search(
        self, queries: Matrix, k: int, allowed: Sequence[int] | None = None
    ) -> tuple[Matrix, Ids]:
        """Top-k (scores, ids) per query; ids of -1 pad rows with fewer hits."""
        selector = None if allowed is None else np.asarray(allowed, dtype=np.int64)
        return await self._run(self._search, queries, k, selector)

    # Blocking parts, run on the index's worker thread.

    def load(self, ids: Ids, vectors: Matrix) -> None:
        """Fill an empty index at start, choosing its kind from the size."""
        self._upsert(ids, vectors)

    def _upsert(self, ids: Ids, vectors: Matrix) -> None:
        if self.approximate:
            self._kill([int(i) for i in ids if int(i) in self._point])
            start = int(self._hnsw.ntotal)
            self._hnsw.add(vectors)
            self._external = np.concatenate([self._external, ids])
            self._point.update({int(i): start + n for n, i in enumerate(ids)})
            self._maybe_compact()
        else:
            if len(ids):
                self._flat.remove_ids(ids)
                self._flat.add_with_ids(vectors, ids)
                self._flat_ids.update(ids.tolist())
            self._gpu_index = None
            if len(self._flat_ids) >= self._ann_threshold:
                self._build_hnsw(*self._flat_vectors())

    def _remove(self, ids: Ids) -> None:
        if self.approximate:
            self._kill([int(i) for i in ids if int(i) in self._point])
            self._maybe_compact()
        else:
            self._flat.remove_ids(ids)
            self._flat_ids.difference_update(ids.tolist())
            self._gpu_index = None

    def _kill(self, ids: list[int]) -> None:
        for vector_id in ids:
            self._dead.add(self._point.pop(vector_id))

    def _search(self, queries: Matrix, k: int, allowed: Ids | None) -> tuple[Matrix, Ids]:
        k = max(1, k)
        if allowed is not None:
            return self._exact_subset(queries, k, allowed)
        if not self.approximate:
            scores, ids = self._searchable().search(queries, min(k, max(self.size, 1)))
            return scores, ids
        params = faiss.SearchParametersHNSW(efSearch=max(self._ef_search, k))
        if self._dead:
            dead = np.fromiter(self._dead, dtype=np.int64, count=len(self._dead))
            params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead))
        scores, points = self._hnsw.search(queries, k, params=params)
        ids = np.where(points >= 0, self._external[np.maximum(points, 0)], -1)
        return scores, ids

    def _exact_subset(self, queries: Matrix, k: int, allowed: Ids) -> tuple[Matrix, Ids]:
        """Brute force over the allowed documents' vectors: exact under any filter."""
        if self.approximate:
            live = [i for i in allowed.tolist() if i in self._point]
            ids = np.asarray(live, dtype=np.int64)
            points = np.asarray([self._point[i] for i in live], dtype=np.int64)
            vectors = self._hnsw.reconstruct_batch(points) if len(points) else None
        else:
            ids = np.asarray([i for i in allowed.tolist() if i in self._flat_ids], dtype=np.int64)
            vectors = self._flat.reconstruct_batch(ids) if len(ids) else None
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        if vectors is None:
            return scores, found
        similarity = queries @ np.asarray(vectors, dtype=np.float32).T
        take = min(k, len(ids))
        for row in range(len(queries)):
            best = np.argpartition(-similarity[row], take - 1)[:take]
            best = best[np.argsort(-similarity[row][best])]
            scores[row, :take] = similarity[row][best]
            found[row, :take] = ids[best]
        return scores, found

    def _searchable(self) -> Any:
        if not self._gpu:
            return self._flat
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._flat)
        return self._gpu_index

    def _flat_vectors(self) -> tuple[Ids, Matrix]:
        ids = np.fromiter(self._flat_ids, dtype=np.int64, count=len(self._flat_ids))
        return ids, np.asarray(self._flat.reconstruct_batch(ids), dtype=np.float32)

    def _live_vectors(self) -> tuple[Ids, Matrix]:
        ids = np.fromiter(self._point.keys(), dtype=np.int64, count=len(self._point))
        points = np.asarray([self._point[int(i)] for i in ids], dtype=np.int64)
        return ids, np.asarray(self._hnsw.reconstruct_batch(points), dtype=np.float32)

    def _build_hnsw(self, ids: Ids, vectors: Matrix) -> None:
        graph = faiss.IndexHNSWFlat(self.dimension, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.add(vectors)
        self._hnsw = graph
        self._external = ids.copy()
        self._point = {int(i): n for n, i in enumerate(ids)}
        self._dead = set()
        self._flat = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))  # memory back
        self._flat_ids = set()
        self._gpu_index = None
        log.info("built an HNSW index of %d vectors", len(ids))

    def _maybe_compact(self) -> None:
        if len(self._dead) > COMPACT_AT * max(int(self._hnsw.ntotal), 1):
            self._build_hnsw(*self._live_vectors())
