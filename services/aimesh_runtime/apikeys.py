"""API keys in services other than user: exchanged for a token, then cached.

The user service alone can check a key (it holds the hashes). Elsewhere an
"x-api-key" is exchanged once through UserService.ExchangeApiKey, behind a
breaker, and the resulting token's principal is cached by the key's hash
until shortly before that token expires.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import grpc

from aimesh.user.v1 import user_service_pb2, user_service_pb2_grpc
from aimesh_runtime.auth import Principal, TokenVerifier
from aimesh_runtime.errors import Unauthenticated, Unavailable
from aimesh_runtime.resilience import BreakerOpen, CircuitBreaker


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
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size

    async def authenticate(self, api_key: str) -> Principal:
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None and cached.expires_at - 10 > time.time():
            return cached
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
        )
        self._cache[digest] = principal
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal
