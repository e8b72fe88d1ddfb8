"""The vector index on random unit vectors: exact below the threshold, HNSW above."""

from __future__ import annotations

import numpy as np

from aimesh_search.index import VectorIndex, faiss


def unit(rows: int, seed: int, dimension: int = 32) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_switches_to_hnsw_and_keeps_ids_deletes_and_replacements() -> None:
    vectors = unit(1500, 0)
    index = VectorIndex(32, ann_threshold=1000, ef_search=64)
    index.load(np.arange(900, dtype=np.int64), vectors[:900])
    assert not index.approximate
    index._upsert(np.arange(900, 1500, dtype=np.int64), vectors[900:])
    assert index.approximate and index.size == 1500
    _, ids = index._search(vectors[:5], 1, None)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    index._remove(np.array([0, 1], dtype=np.int64))
    _, ids = index._search(vectors[:2], 10, None)
    assert not {0, 1} & set(ids.ravel().tolist()), "deleted ids never come back"
    fresh = unit(1, 9)
    index._upsert(np.array([2], dtype=np.int64), fresh)  # id 2 gets a new vector
    _, ids = index._search(fresh, 1, None)
    assert ids[0, 0] == 2
    _, ids = index._search(vectors[2:3], 5, None)
    assert 2 not in ids[0].tolist(), "the replaced vector is gone"
    assert index.size == 1498
    index.close()


def test_filtered_search_is_exact_on_both_kinds() -> None:
    vectors = unit(1200, 1)
    allowed = np.random.default_rng(2).choice(1200, 60, replace=False).astype(np.int64)
    query = unit(1, 3)
    expected = allowed[np.argsort(-(vectors[allowed] @ query[0]))[:10]].tolist()
    for threshold in (5000, 1000):
        index = VectorIndex(32, ann_threshold=threshold, ef_search=16)
        index.load(np.arange(1200, dtype=np.int64), vectors)
        _, ids = index._search(query, 10, allowed)
        assert ids[0].tolist() == expected
        index.close()


def test_tombstones_are_compacted_away() -> None:
    vectors = unit(1200, 4)
    index = VectorIndex(32, ann_threshold=1000, ef_search=64)
    index.load(np.arange(1200, dtype=np.int64), vectors)
    index._remove(np.arange(400, dtype=np.int64))
    assert index._hnsw.ntotal == 800 and not index._dead, "rebuilt without the dead"
    _, ids = index._search(vectors[500:501], 1, None)
    assert ids[0, 0] == 500
    index.close()


async def test_searches_run_with_the_configured_openmp_threads() -> None:
    """OpenMP's count is per thread: it must be set in the index's own thread,
    where every search runs, or its spinning workers take the encoders' cores."""
    for threads in (1, 2):
        index = VectorIndex(32, ann_threshold=1000, ef_search=16, search_threads=threads)
        try:
            assert await index._run(faiss.omp_get_max_threads) == threads
        finally:
            index.close()
