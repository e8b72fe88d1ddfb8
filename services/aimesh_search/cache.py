"""An LRU cache of query embeddings, in front of the encoder batcher."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from aimesh_search.batcher import Embedded


class QueryCache:
    """Least-recently-used query embeddings, keyed by model and text."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, str], Embedded] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, model: str, text: str) -> Embedded | None:
        entry = self._entries.get((model, text))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end((model, text))
        self.hits += 1
        return entry

    def put(self, model: str, text: str, vector: np.ndarray, truncated: bool) -> None:
        if self._size == 0:
            return
        self._entries[(model, text)] = (vector, truncated)
        self._entries.move_to_end((model, text))
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
