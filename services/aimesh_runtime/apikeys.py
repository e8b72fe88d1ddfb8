"""API keys in services other than user: exchanged for a token, then cached.

The user service alone can check a key (it holds the hashes). Elsewhere an
"x-api-key" is exchanged through UserService.ExchangeApiKey, behind a
breaker, and the principal is cached by the key's hash for a minute, so a
revoked key stops working everywhere within a minute; a cached key of a user
disabled or deleted since is refused at once (TokenVerifier.refuse_revoked).
Rejected keys are
remembered for a while too, so a flood of bad keys costs the user service
little.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict

import grpc

from aimesh.user.v1 import user_service_pb2, user_service_pb2_grpc
from aimesh_runtime.auth import Principal, TokenVerifier
from aimesh_runtime.errors import Unauthenticated, Unavailable
from aimesh_runtime.resilience import BreakerOpen, CircuitBreaker

API_KEY_SHAPE = re.compile(r"^amk_[0-9a-f]{8}_[A-Za-z0-9_-]{20,100}$")
ACCEPTED_TTL_S = 60.0  # how long a revoked key may still work outside the user service
REJECTED_TTL_S = 30.0


class ExchangedApiKeys:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        verifier: TokenVerifier,
        *,
        timeout_s: float = 2.0,
        cache_size: int = 10_000,
    ) -> None:
        self._stub = user_service_pb2_grpc.UserServiceStub(channel)
        self._verifier = verifier
        self._timeout_s = timeout_s
        self._breaker = CircuitBreaker("user.ExchangeApiKey")
        # digest -> (principal or None for a rejected key, time.monotonic() it expires)
        self._cache: OrderedDict[str, tuple[Principal | None, float]] = OrderedDict()
        self._cache_size = cache_size

    async def authenticate(self, api_key: str) -> Principal:
        if not API_KEY_SHAPE.match(api_key):  # not worth a call to the user service
            raise Unauthenticated("API key rejected", reason="API_KEY_INVALID")
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            if cached[0] is None:
                raise Unauthenticated("API key rejected", reason="API_KEY_INVALID")
            await self._verifier.refuse_revoked(cached[0])
            return cached[0]
        request = user_service_pb2.ExchangeApiKeyRequest(api_key=api_key)
        try:
            response = await self._breaker.call(
                lambda: self._stub.ExchangeApiKey(request, timeout=self._timeout_s)
            )
        except BreakerOpen:
            raise Unavailable(
                "cannot check API keys now; use a token", reason="USER_SERVICE_DOWN"
            ) from None
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                self._remember(digest, None, REJECTED_TTL_S)
                raise Unauthenticated("API key rejected", reason="API_KEY_INVALID") from None
            raise Unavailable(
                "cannot check API keys now; use a token", reason="USER_SERVICE_DOWN"
            ) from None
        principal = await self._verifier.verify(response.access_token)
        principal = Principal(
            subject=principal.subject,
            scopes=principal.scopes,
            method="api_key",
            expires_at=principal.expires_at,
            token=principal.token,
            issued_at=principal.issued_at,
        )
        self._remember(digest, principal, min(ACCEPTED_TTL_S, principal.expires_at - time.time()))
        return principal

    def _remember(self, digest: str, principal: Principal | None, ttl_s: float) -> None:
        self._cache[digest] = (principal, time.monotonic() + ttl_s)
        self._cache.move_to_end(digest)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
