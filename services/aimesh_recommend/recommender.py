"""Serving: interactions in, recommendations out, with the popularity fallback.

The deployment serves one model version, named in its config. Whatever stops
the model from answering (version not READY, user not in the model, scoring
failing or its breaker open) makes a popularity ranking answer instead,
flagged with the reason; an unknown user is never an error. Every answer gets
a serving id, and servings are written in batches off the request path so that
outcomes can be attributed to the version that served them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import itertools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aimesh_recommend import model as mf
from aimesh_recommend.cache import Cached, ResultCache
from aimesh_recommend.content import ContentIndex
from aimesh_recommend.scoring import MAX_K, Ranked, ScoreRequest, ServingModel
from aimesh_recommend.settings import RecommendSettings
from aimesh_recommend.store import ItemRow, NewInteraction, RecommendStore, Serving
from aimesh_runtime import audit
from aimesh_runtime.batching import MicroBatcher
from aimesh_runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from aimesh_runtime.pages import cut_page, decode_page_token, encode_page_token, page_size
from aimesh_runtime.resilience import BreakerOpen, CircuitBreaker, FirstLoad

log = logging.getLogger(__name__)
POPULAR_KEPT = 1000
FIRST_LOAD_WAIT_S = 10.0


class FallbackReason(enum.IntEnum):
    """Why a fallback answered instead of the model. The numbers are the contract's
    (the servicer maps by name) and are what the result cache stores."""

    NONE = 0  # the model answered
    MODEL_MISSING = 1
    USER_UNKNOWN = 2
    ITEM_UNKNOWN = 3
    BREAKER_OPEN = 4

    @property
    def serving_label(self) -> str:
        """How the servings table records it ("" when the model answered)."""
        return "" if self is FallbackReason.NONE else f"FALLBACK_REASON_{self.name}"


@dataclass(frozen=True)
class Recommendation:
    items: list[tuple[str, float]]
    model_version: str
    fallback_reason: FallbackReason
    serving_id: str


@dataclass(frozen=True)
class Similar:
    items: list[tuple[str, float]]
    fallback_reason: FallbackReason


class ServingLog:
    """Servings buffered in memory and written in batches, with one audit record per
    batch: one transaction per flush instead of a write (and an audit-chain lock)
    per request, which would cap serving at the database's commit rate."""

    def __init__(self, store: RecommendStore, flush_s: float) -> None:
        self._store = store
        self._flush_s = flush_s
        self._pending: list[Serving] = []

    def add(self, serving: Serving) -> None:
        self._pending.append(serving)

    def forget(self, user: str) -> None:
        """Drop a user's unwritten servings (their data is being erased)."""
        self._pending = [s for s in self._pending if s.user != user]

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            async with self._store.pool.acquire() as connection, connection.transaction():
                await self._store.add_servings(pending, connection)
                for version in sorted({s.model_version for s in pending}):
                    await audit.record(
                        connection,
                        kind="recommendation",
                        subject=f"modelVersions/{version}",
                        decision={
                            # serving id, user, fallback reason ("" when the model ranked)
                            "servings": [
                                [s.id, s.user, s.fallback_reason]
                                for s in pending
                                if s.model_version == version
                            ],
                        },
                    )
        except Exception:
            log.exception("could not write %d servings; they are lost", len(pending))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()


def _scoring_fault(error: BaseException) -> bool:
    # The model breaker counts scoring failures, not a full queue (back-pressure).
    return not isinstance(error, ResourceExhausted)


class Recommender:
    def __init__(
        self,
        store: RecommendStore,
        settings: RecommendSettings,
        cache: ResultCache,
        batcher: MicroBatcher[ScoreRequest, Ranked],
        content: ContentIndex,
        servings: ServingLog,
        device: torch.device,
    ) -> None:
        self._store = store
        self.settings = settings
        self.version = settings.model_version
        self._cache = cache
        self._batcher = batcher
        self.content = content
        self._servings = servings
        self.device = device
        self.model: ServingModel | None = None
        self.model_breaker = CircuitBreaker("recommend-model", is_failure=_scoring_fault)
        self._popular: list[tuple[str, float]] = []
        self._catalogue: set[str] = set()
        self._catalogue_version: int | None = None
        # Serving ids: unique per process by the counter, across processes by
        # the random prefix; no system call per recommendation as uuid4 makes.
        self._serving_prefix = secrets.token_hex(8)
        self._serving_numbers = itertools.count()
        # Catalogue and popularity read once: ready to serve.
        self._first_load = FirstLoad(
            "recommendations are still loading; retry shortly", FIRST_LOAD_WAIT_S
        )

    # loading

    async def refresh(self) -> None:
        """Load the served version once it is READY; reread the catalogue when
        it changed, and popularity."""
        # The version is read before the ids: a change landing in between is
        # read now and again next time, never missed.
        version = await self._store.catalogue_version()
        changed = version != self._catalogue_version
        if changed:
            self._catalogue = set(await self._store.item_ids())
            self._catalogue_version = version
        self._popular = await self._store.popularity(POPULAR_KEPT)
        loaded_now = False
        if self.model is None:
            await self._load()
            loaded_now = True
        if (changed or loaded_now) and self.model is not None:
            self.model.set_catalogue(self._catalogue)
        self._first_load.set()

    @property
    def loaded(self) -> bool:
        return self._first_load.done

    async def until_loaded(self) -> None:
        """Wait for the first load rather than answering, and caching, an empty fallback."""
        await self._first_load.wait()

    async def _load(self) -> None:
        artifact = await self._store.artifact(self.version)
        if artifact is None:
            return
        try:
            state = mf.from_bytes(artifact.blob)
        except Exception:
            log.exception("artifact of %s failed to load; serving the fallback", self.version)
            return
        pairs = await self._store.seen_pairs()
        loop = asyncio.get_running_loop()
        self.model = await loop.run_in_executor(
            None,
            ServingModel,
            self.version,
            state,
            artifact.user_ids,
            artifact.item_ids,
            pairs,
            self.device,
        )
        log.info(
            "serving model %s: %d users, %d items on %s",
            self.version, len(artifact.user_ids), len(artifact.item_ids), self.device,
        )  # fmt: skip

    async def run_refresh(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("refresh failed; serving what is loaded")
            await asyncio.sleep(self.settings.refresh_s)

    # interactions

    async def record(self, interactions: Sequence[NewInteraction]) -> tuple[int, int]:
        ids = [i.id for i in interactions]
        recorded = await self._store.record(interactions)
        if recorded:
            await self._cache.invalidate(i.user for i in interactions)
            if self.model is not None:
                for interaction in interactions:
                    self.model.add_seen(interaction.user, interaction.item)
        return recorded, len(ids) - recorded

    async def purge(self, user: str) -> int:
        self._servings.forget(user)  # or a later flush would write the id back into audit
        deleted = await self._store.purge_user(user)
        await self._cache.invalidate([user])
        return deleted

    # catalogue

    async def upsert_items(self, items: Sequence[tuple[str, str, dict[str, Any]]]) -> list[ItemRow]:
        names = [item[0] for item in items]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidArgument(
                f"items named more than once: {', '.join('items/' + n for n in twice)}",
                reason="DUPLICATE_ITEM",
            )
        rows = await self._store.upsert_items(items)
        pending = [(row.id, row.text) for row in rows if not row.content_embedded]
        embedded = await self.content.embed(pending)
        if embedded:
            texts = {row.id: row.text for row in rows}
            await self._store.mark_embedded(sorted(embedded), [texts[i] for i in sorted(embedded)])
            rows = [
                ItemRow(r.id, r.text, r.metadata, True, r.create_time, r.update_time)
                if r.id in embedded
                else r
                for r in rows
            ]
        for row in rows:
            self._catalogue.add(row.id)
            if self.model is not None:
                self.model.set_active(row.id, True)
        return rows

    async def item(self, item_id: str) -> ItemRow:
        row = await self._store.item(item_id)
        if row is None:
            raise NotFound(
                f"items/{item_id} does not exist",
                reason="ITEM_NOT_FOUND",
                metadata={"item": f"items/{item_id}"},
            )
        return row

    async def list_items(self, size: int, token: str) -> tuple[list[ItemRow], str]:
        limit = page_size(size)
        position = decode_page_token(token)
        after = "" if position is None else str(position)
        rows = await self._store.items(after, limit + 1)
        return cut_page(rows, limit, lambda row: encode_page_token(row.id))

    async def delete_item(self, item_id: str) -> None:
        if not await self._store.delete_item(item_id):
            await self.item(item_id)  # raises NOT_FOUND
        self._catalogue.discard(item_id)
        if self.model is not None:
            self.model.set_active(item_id, False)
        await self.content.forget(item_id)

    # recommendations

    async def recommend(self, user: str, k: int, include_seen: bool) -> Recommendation:
        await self.until_loaded()
        model = self.model
        key = f"{self.version}:{'m' if model else '-'}:{int(include_seen)}"
        cached = await self._cache.get(user, key)
        if cached is None:
            cached = await self._rank(model, user, include_seen)
            await self._cache.put(user, key, cached)
        serving_id = f"{self._serving_prefix}{next(self._serving_numbers):016x}"
        reason = FallbackReason(cached.fallback_reason)
        self._servings.add(
            Serving(
                serving_id, user, self.version, reason.serving_label, dt.datetime.now(dt.UTC)
            )
        )  # fmt: skip
        # A cached answer may name an item deleted since, here or on another replica.
        catalogue = self._catalogue
        items = list(
            itertools.islice(
                (
                    (i, s)
                    for i, s in zip(cached.items, cached.scores, strict=True)
                    if i in catalogue
                ),
                k,
            )
        )
        return Recommendation(items, self.version, reason, serving_id)

    async def _rank(self, model: ServingModel | None, user: str, include_seen: bool) -> Cached:
        if model is None:
            return await self._popularity(user, include_seen, FallbackReason.MODEL_MISSING)
        row = model.user_index.get(user)
        if row is None:
            return await self._popularity(user, include_seen, FallbackReason.USER_UNKNOWN)
        exclude = () if include_seen else tuple(model.seen.get(row, ()))
        request = ScoreRequest(model, row, exclude)
        try:
            scored = await self.model_breaker.call(lambda: self._batcher.submit([request]))
            ranked = scored[0]
        except BreakerOpen:
            return await self._popularity(user, include_seen, FallbackReason.BREAKER_OPEN)
        except ResourceExhausted:
            raise  # back-pressure: the caller retries after RetryInfo
        except Exception:
            log.exception("model %s could not score", self.version)
            return await self._popularity(user, include_seen, FallbackReason.MODEL_MISSING)
        return Cached(list(map(model.item_ids.__getitem__, ranked.rows)), ranked.scores, 0)

    async def _popularity(self, user: str, include_seen: bool, reason: FallbackReason) -> Cached:
        seen = set() if include_seen else set(await self._store.seen_items(user))
        chosen = [(item, score) for item, score in self._popular if item not in seen]
        chosen = chosen[:MAX_K]
        return Cached([i for i, _ in chosen], [s for _, s in chosen], int(reason))

    async def similar(self, item_id: str, k: int) -> Similar:
        """Similar items, by the model's embeddings or else by content or popularity."""
        await self.until_loaded()
        row = await self.item(item_id)
        model = self.model
        if model is not None and item_id in model.item_index:
            ranked = await self._batcher.on_lane(model.similar, model.item_index[item_id], k)
            names = model.item_ids
            items = [(names[i], s) for i, s in zip(ranked.rows, ranked.scores, strict=True)]
            return Similar(items, FallbackReason.NONE)
        reason = FallbackReason.ITEM_UNKNOWN
        if model is None:
            reason = FallbackReason.MODEL_MISSING
        found = await self.content.neighbours(row.text, k + 1)
        if found.unavailable == "breaker":
            reason = FallbackReason.BREAKER_OPEN
        items = [(i, s) for i, s in found.items if i != item_id and i in self._catalogue][:k]
        if not items:  # no content answer either: the most popular other items
            items = [(i, s) for i, s in self._popular if i != item_id][:k]
        return Similar(items, reason)

    async def close(self) -> None:
        await self._servings.flush()
        with contextlib.suppress(Exception):
            await self._cache.close()
