"""Deliveries of a webhook subscription, read with their attempts, and redriven."""

from __future__ import annotations

from dataclasses import dataclass

from aimesh_notify.delivery_store import DeliveryRow, DeliveryStore
from aimesh_notify.subscriptions import Subscriptions
from aimesh_runtime.auth import Principal
from aimesh_runtime.pages import (
    bad_page_token,
    cut_page,
    decode_page_token,
    encode_page_token,
    page_size,
)

ALL_SUBSCRIPTIONS = "subscriptions/-"


@dataclass(frozen=True)
class Page:
    items: list[DeliveryRow]
    next_page_token: str


class Deliveries:
    def __init__(self, store: DeliveryStore, subscriptions: Subscriptions) -> None:
        self._store = store
        self._subscriptions = subscriptions

    async def list(
        self, caller: Principal, parent: str, status: str | None, size: int, token: str
    ) -> Page:
        subscription = await self._subscriptions.get(caller, parent, "parent")
        limit = page_size(size)
        before = decode_page_token(token)
        if before is not None and not (isinstance(before, int) and before > 0):
            raise bad_page_token()
        rows = await self._store.deliveries(subscription.id, status, before, limit + 1)
        return Page(*cut_page(rows, limit, lambda row: encode_page_token(row.id)))

    async def redrive(self, caller: Principal, parent: str) -> int:
        if parent == ALL_SUBSCRIPTIONS:
            return await self._store.redrive(None)
        subscription = await self._subscriptions.get(caller, parent, "parent")
        return await self._store.redrive(subscription.id)
