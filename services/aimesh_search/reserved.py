"""Collection ids the platform's services use, which no member may take first.

Recommend embeds its catalogue into one collection ("recommend-items" unless
AIMESH_RECOMMEND_SEARCH_COLLECTION names another), created by the first
UpsertItems: a member who created that id before would own the catalogue's
embeddings, and could rewrite what every SimilarItems answers. So the ids in
AIMESH_SEARCH_RESERVED_COLLECTIONS, and every id that starts with "platform-"
(in any case), are created only by admins and service accounts.
"""

from __future__ import annotations

from collections.abc import Iterable

from aimesh_runtime.auth import Principal
from aimesh_runtime.errors import PermissionDenied
from aimesh_runtime.ownership import is_service_account

RESERVED_PREFIX = "platform-"


class ReservedCollections:
    def __init__(self, ids: Iterable[str]) -> None:
        # Compared without case, so "Recommend-Items" is no look-alike a member may take.
        self._ids = frozenset(i.strip().lower() for i in ids if i.strip())

    def is_reserved(self, collection_id: str) -> bool:
        lowered = collection_id.lower()
        return lowered in self._ids or lowered.startswith(RESERVED_PREFIX)

    def check_create(self, collection_id: str, caller: Principal) -> None:
        """Raise PERMISSION_DENIED if `caller` may not create `collection_id`."""
        if not self.is_reserved(collection_id):
            return
        if "search.admin" in caller.scopes or is_service_account(caller):
            return
        raise PermissionDenied(
            f"collections/{collection_id} is reserved to the platform's services",
            reason="RESERVED_COLLECTION",
            metadata={"name": f"collections/{collection_id}"},
        )
