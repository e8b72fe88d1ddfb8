"""FAISS index of one collection: exact while small, IVF once large, stable ids.

Each document has a stable 64-bit vector id (its row's `vector_id`), so
upserts replace and deletes remove by id. Below `ann_threshold` vectors the
index is an exact inner-product scan (IndexFlatIP: vectors are unit length, so
this is cosine similarity). At the threshold it is rebuilt as an IVF index
(IndexIVFFlat, about 4·√n lists, trained on the collection) that still
supports removal, and retrained when it has grown fourfold since.

Filters are exact: a filtered search passes the matching ids as a FAISS
IDSelector and, on an IVF index, probes every list, so it returns the same
top_k as a brute-force scan of the matching documents (no over-fetching, no
lost recall).

All FAISS calls for one collection run on one worker thread: mutations and
searches never overlap (FAISS indexes are not safe to mutate while searched),
and the event loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
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


def gpu_count() -> int:
    counter = getattr(faiss, "get_num_gpus", None)
    return int(counter()) if counter is not None else 0


class VectorIndex:
    def __init__(
        self, dimension: int, *, ann_threshold: int, nprobe: int, use_gpu: bool = False
    ) -> None:
        self.dimension = dimension
        self._ann_threshold = ann_threshold
        self._nprobe = nprobe
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._trained_on = 0
        self._nlist = 0
        self._ids: set[int] = set()  # FAISS cannot list an IVF index's ids itself
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faiss")
        # A GPU copy serves searches; the CPU index stays the source of truth and
        # the copy is refreshed after writes.
        self._gpu = use_gpu and gpu_count() > 0
        self._gpu_resources = faiss.StandardGpuResources() if self._gpu else None
        self._gpu_index: Any = None

    @property
    def approximate(self) -> bool:
        return self._nlist > 0

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

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
        if len(ids):
            self._index.add_with_ids(vectors, ids)
            self._ids.update(ids.tolist())
        self._maybe_rebuild()
        self._gpu_index = None

    def _upsert(self, ids: Ids, vectors: Matrix) -> None:
        self._index.remove_ids(ids)
        self._index.add_with_ids(vectors, ids)
        self._ids.update(ids.tolist())
        self._maybe_rebuild()
        self._gpu_index = None

    def _remove(self, ids: Ids) -> None:
        self._index.remove_ids(ids)
        self._ids.difference_update(ids.tolist())
        self._gpu_index = None

    def _search(self, queries: Matrix, k: int, allowed: Ids | None) -> tuple[Matrix, Ids]:
        k = max(1, min(k, max(self.size, 1)))
        if allowed is not None:
            if len(allowed) == 0:
                return (
                    np.full((len(queries), k), -np.inf, dtype=np.float32),
                    np.full((len(queries), k), -1, dtype=np.int64),
                )
            selector = faiss.IDSelectorBatch(allowed)
            if self.approximate:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self._nlist)
            else:
                params = faiss.SearchParameters(sel=selector)
            scores, ids = self._index.search(queries, k, params=params)
            return scores, ids
        index = self._searchable()
        scores, ids = index.search(queries, k)
        return scores, ids

    def _searchable(self) -> Any:
        if not self._gpu:
            return self._index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
        return self._gpu_index

    def _all_vectors(self) -> tuple[Ids, Matrix]:
        ids = np.fromiter(self._ids, dtype=np.int64, count=len(self._ids))
        if not len(ids):
            return ids, np.zeros((0, self.dimension), dtype=np.float32)
        return ids, np.asarray(self._index.reconstruct_batch(ids), dtype=np.float32)

    def _maybe_rebuild(self) -> None:
        size = self.size
        grown = self.approximate and size >= 4 * self._trained_on
        if size < self._ann_threshold or (self.approximate and not grown):
            return
        ids, vectors = self._all_vectors()
        nlist = int(min(max(16, 4 * math.sqrt(size)), size // 39))
        quantizer = faiss.IndexFlatIP(self.dimension)
        ivf = faiss.IndexIVFFlat(quantizer, self.dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if len(vectors) > nlist * 64:  # enough points per centroid, far faster training
            picks = np.random.default_rng(0).choice(len(vectors), nlist * 64, replace=False)
            sample = vectors[picks]
        ivf.train(sample)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by id
        ivf.add_with_ids(vectors, ids)
        ivf.nprobe = min(self._nprobe, nlist)
        self._quantizer = quantizer  # the IVF index uses it but does not own it
        self._index = ivf
        self._nlist = nlist
        self._trained_on = size
        log.info("rebuilt a %d-vector index as IVF with %d lists", size, nlist)
