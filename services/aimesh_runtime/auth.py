"""Caller identity: access policies from the contracts, JWT verification, API keys.

Each RPC's AccessPolicy is read from the generated descriptors (the
`aimesh.options.v1.access` method option). A method with no policy is denied.
Tokens are EdDSA JWTs from the user service; they are checked strictly
(algorithm, type, kid, issuer, audience, time claims, lifetime) and a verified
token is cached until it expires, so the per-call cost is a dictionary lookup.
Tokens issued before their user's "not before" time (the user was disabled or
deleted since) are refused, cached or not (see revocation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aimesh.options.v1 import access_pb2
from aimesh_runtime.errors import PermissionDenied, Unauthenticated
from aimesh_runtime.revocation import Revocations

log = logging.getLogger(__name__)

TOKEN_TYPE = "at+jwt"  # RFC 9068 access-token type; other JWTs are refused
SIGNING_ALGORITHM = "EdDSA"
# Infrastructure methods that load balancers and tools call without credentials.
INFRASTRUCTURE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user id (token subject), the scopes it holds, and how."""

    subject: str
    scopes: frozenset[str]
    method: str  # "jwt", "api_key" or "anonymous"
    expires_at: float = 0.0
    token: str = field(default="", repr=False)
    issued_at: float = 0.0  # the token's iat, checked against its user's not-before time

    def has_scopes(self, required: Iterable[str]) -> bool:
        return self.scopes.issuperset(required)

    @property
    def is_admin(self) -> bool:
        return bool(self.scopes & ADMIN_SCOPES)


ANONYMOUS = Principal(subject="", scopes=frozenset(), method="anonymous")
ADMIN_SCOPES = frozenset({"user.admin"})


@dataclass(frozen=True)
class MethodPolicy:
    public: bool
    scopes: tuple[str, ...]


def policies_for(services: Iterable[ServiceDescriptor]) -> dict[str, MethodPolicy]:
    """Map '/pkg.Service/Method' to its policy, for methods that declare one."""
    found: dict[str, MethodPolicy] = {}
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(access_pb2.access):
                continue
            access = options.Extensions[access_pb2.access]
            found[f"/{service.full_name}/{method.name}"] = MethodPolicy(
                public=access.public, scopes=tuple(access.scopes)
            )
    return found


def authorize(method: str, policy: MethodPolicy | None, principal: Principal) -> None:
    """Raise unless `principal` may call `method`."""
    if policy is None:
        raise PermissionDenied(f"{method} has no access rule and is denied", reason="NO_RULE")
    if policy.public:
        return
    if principal.method == "anonymous":
        raise Unauthenticated("credentials required", reason="CREDENTIALS_MISSING")
    missing = [scope for scope in policy.scopes if scope not in principal.scopes]
    if missing:
        raise PermissionDenied(
            f"missing scope {', '.join(missing)}",
            reason="SCOPE_MISSING",
            metadata={"scopes": ",".join(missing)},
        )


JwksFetcher = Callable[[], Awaitable[Mapping[str, Any]]]


def http_jwks_fetcher(
    url: str, timeout_s: float = 2.0, tracer_provider: TracerProvider | None = None
) -> JwksFetcher:
    """Fetch a JWKS document over HTTP, as Envoy's jwt_authn does.

    The fetch is a hop of the request that needed the keys: it gets a client
    span and sends traceparent, so the user service's side can join the trace.
    """
    import httpx

    tracer = trace.get_tracer("aimesh.jwks", tracer_provider=tracer_provider)

    async def fetch() -> Mapping[str, Any]:
        span = tracer.start_span(
            "GET /.well-known/jwks.json",
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": "GET", "url.full": url},
        )
        current = otel_context.get_current()
        if span.get_span_context().is_valid:  # a no-op tracer passes the caller's trace on
            current = trace.set_span_in_context(span, current)
        headers: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(headers, context=current)
        with trace.use_span(span, end_on_exit=True, record_exception=True):
            async with httpx.AsyncClient(timeout=timeout_s) as client:
                response = await client.get(url, headers=headers)
            span.set_attribute("http.response.status_code", response.status_code)
            response.raise_for_status()
            document: Mapping[str, Any] = response.json()
            return document

    return fetch


def _consume(task: asyncio.Task[None]) -> None:
    """Retrieve a finished fetch's outcome, so one nobody waited for is not logged."""
    if not task.cancelled():
        task.exception()


class TokenVerifier:
    """Verify access tokens against a JWKS, refreshing it when a kid is new."""

    def __init__(
        self,
        fetch_jwks: JwksFetcher,
        *,
        issuer: str,
        audience: str,
        max_lifetime_s: int,
        leeway_s: float = 5.0,
        refresh_interval_s: float = 300.0,
        min_refetch_s: float = 10.0,
        cache_size: int = 10_000,
        revocations: Revocations | None = None,
    ) -> None:
        self._fetch_jwks = fetch_jwks
        self._revocations = revocations
        self._issuer = issuer
        self._audience = audience
        self._max_lifetime_s = max_lifetime_s
        self._leeway_s = leeway_s
        self._refresh_interval_s = refresh_interval_s
        self._min_refetch_s = min_refetch_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -1e9  # last successful fetch
        self._attempted_at = -1e9  # last attempt, successful or not
        self._fetch_lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._fetching: asyncio.Task[None] | None = None
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified before, not yet expired, and known
        not to be revoked; None when that needs waiting (verify() then decides)."""
        found = self._cache.get(token)
        if found is not None and found.expires_at > time.time() - self._leeway_s:
            revocations = self._revocations
            if revocations is None or (
                revocations.fresh() and not revocations.revoked(found.subject, found.issued_at)
            ):
                return found
        return None

    async def verify(self, token: str) -> Principal:
        cached = self.cached(token)
        if cached is not None:
            return cached
        found = self._cache.get(token)
        if found is None or found.expires_at <= time.time() - self._leeway_s:
            self._cache.pop(token, None)
            found = await self._verify_uncached(token)
            self._cache[token] = found
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        await self.refuse_revoked(found)
        return found

    async def refuse_revoked(self, principal: Principal) -> None:
        """Unauthenticated if the principal's user was disabled or deleted after
        its token was issued (also for principals cached elsewhere, such as
        exchanged API keys); Unavailable if that cannot be known now."""
        if self._revocations is None:
            return
        await self._revocations.ensure_fresh()
        if self._revocations.revoked(principal.subject, principal.issued_at):
            raise Unauthenticated(
                "token revoked: the account was disabled or deleted", reason="TOKEN_REVOKED"
            )

    def forget_cache(self) -> None:
        self._cache.clear()

    async def close(self) -> None:
        """Cancel key and revocation fetches still under way, as the server stops."""
        for task in (self._background, self._fetching):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._revocations is not None:
            await self._revocations.close()

    async def _key_for(self, kid: str) -> jwt.PyJWK:
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None:
            if now - self._fetched_at > self._refresh_interval_s and (
                self._background is None or self._background.done()
            ):
                # Known keys keep verifying while a refresh runs behind them.
                self._background = asyncio.create_task(self._refresh())
            return key
        if self._fetch_lock.locked():
            # A fetch is under way (the first requests after start arrive together):
            # wait for it, its keys may hold this kid.
            async with self._fetch_lock:
                pass
        elif now - self._attempted_at > self._min_refetch_s:
            # A new kid means the issuer rotated; refetch, but at most every
            # min_refetch_s, or forged kids (or a dead issuer) would cost a fetch each.
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("token signed by an unknown key", reason="UNKNOWN_KID")
        return key

    async def _refresh(self) -> None:
        """Fetch the keys in a task of their own that the callers wait on.

        A caller that gives up (its deadline passes: the request task is
        cancelled) must not cancel the fetch: the attempt is already stamped, so
        every later request would be refused "unknown key" until min_refetch_s
        had passed, though the issuer was fine.
        """
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch_keys())
            self._fetching.add_done_callback(_consume)
        await asyncio.shield(self._fetching)

    async def _fetch_keys(self) -> None:
        started = time.monotonic()
        async with self._fetch_lock:
            if self._attempted_at >= started:  # another caller fetched while we waited
                return
            self._attempted_at = time.monotonic()
            try:
                document = await self._fetch_jwks()
                if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
                    raise ValueError("JWKS document has no keys list")
            except Exception as error:  # keep serving with the keys we have
                log.warning("jwks fetch failed: %s", error)
                if not self._keys:
                    raise Unauthenticated(
                        "token keys unavailable", reason="JWKS_UNAVAILABLE"
                    ) from error
                return
            keys: dict[str, jwt.PyJWK] = {}
            for entry in document["keys"]:
                if not isinstance(entry, Mapping):
                    continue
                if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
                    continue
                try:
                    keys[entry["kid"]] = jwt.PyJWK(dict(entry), algorithm=SIGNING_ALGORITHM)
                except (jwt.PyJWKError, KeyError, TypeError, ValueError) as error:
                    log.warning("skipping malformed jwk: %s", error)
            self._keys = keys
            self._fetched_at = time.monotonic()

    async def _verify_uncached(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token", reason="TOKEN_MALFORMED") from None
        if header.get("alg") != SIGNING_ALGORITHM:
            raise Unauthenticated("token algorithm not accepted", reason="TOKEN_ALGORITHM")
        if header.get("typ") != TOKEN_TYPE:
            raise Unauthenticated("token type not accepted", reason="TOKEN_TYPE")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token has no key id", reason="UNKNOWN_KID")
        key = await self._key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[SIGNING_ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid", reason="TOKEN_NOT_YET_VALID") from None
        except jwt.PyJWTError:
            raise Unauthenticated("token rejected", reason="TOKEN_INVALID") from None
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)):
            raise Unauthenticated("token rejected", reason="TOKEN_INVALID")
        if exp - iat > self._max_lifetime_s:
            raise Unauthenticated("token lifetime too long", reason="TOKEN_LIFETIME")
        if iat > time.time() + self._leeway_s:
            raise Unauthenticated("token issued in the future", reason="TOKEN_NOT_YET_VALID")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise Unauthenticated("token rejected", reason="TOKEN_INVALID")
        # Tokens exchanged for an API key say so, so key management can refuse them.
        amr = claims.get("amr")
        return Principal(
            subject=str(claims["sub"]),
            scopes=frozenset(scope.split()),
            method="api_key" if isinstance(amr, list) and "api_key" in amr else "jwt",
            expires_at=float(exp),
            token=token,
            issued_at=float(iat),
        )


class ApiKeyAuthenticator(Protocol):
    """Turns an API key into a principal, or raises Unauthenticated."""

    async def authenticate(self, api_key: str) -> Principal: ...


def jwks_document(keys: Iterable[Mapping[str, Any]]) -> bytes:
    return json.dumps({"keys": list(keys)}, separators=(",", ":")).encode()
