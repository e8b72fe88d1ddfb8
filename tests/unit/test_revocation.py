"""The verifier's not-before list: revoked tokens refused, cached or not, and
no token accepted on a list too old to trust."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from aimesh_runtime.auth import TokenVerifier
from aimesh_runtime.errors import Unauthenticated, Unavailable
from aimesh_runtime.revocation import DOCUMENT_MEMBER, Revocations, not_before_of
from tests.tokens import claims, jwks, signed


class Issuer:
    """A JWKS document source whose not-before list and health the test sets."""

    def __init__(self) -> None:
        self.not_before: dict[str, float] = {}
        self.down = False
        self.fetches = 0

    async def fetch(self) -> Mapping[str, Any]:
        self.fetches += 1
        if self.down:
            raise OSError("connection refused")
        return {**await jwks(), DOCUMENT_MEMBER: dict(self.not_before)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verifier_for(issuer: Issuer, clock: Clock, max_stale_s: float = 60.0) -> TokenVerifier:
    revocations = Revocations(
        issuer.fetch, poll_s=max_stale_s / 5, max_stale_s=max_stale_s, clock=clock
    )
    return TokenVerifier(
        jwks, issuer="aimesh-user", audience="aimesh", max_lifetime_s=3600, revocations=revocations
    )


async def test_tokens_issued_before_their_users_not_before_are_refused_cached_or_not() -> None:
    issuer, clock = Issuer(), Clock()
    verifier = verifier_for(issuer, clock, max_stale_s=5.0)
    now = int(time.time())
    old, other = signed(claims(sub="u1", iat=now - 10)), signed(claims(sub="u2", iat=now - 10))
    assert (await verifier.verify(old)).issued_at == now - 10
    assert verifier.cached(old) is not None  # cached, and the list is fresh
    issuer.not_before = {"u1": now - 5.0}
    # The next fetch (once the copy is older than max_stale_s) brings the revocation.
    clock.now += 6.0
    assert verifier.cached(old) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        await verifier.verify(old)
    assert verifier.cached(old) is None
    assert (await verifier.verify(other)).subject == "u2"
    # A token issued after the not-before time (the account was enabled again) works.
    assert (await verifier.verify(signed(claims(sub="u1", iat=now - 4)))).subject == "u1"


async def test_no_token_is_accepted_on_a_list_older_than_max_stale() -> None:
    issuer, clock = Issuer(), Clock()
    verifier = verifier_for(issuer, clock, max_stale_s=5.0)
    token = signed(claims())
    await verifier.verify(token)
    issuer.down = True
    clock.now += 3.0
    assert verifier.cached(token) is not None  # a failed poll: the copy is young enough
    assert await verifier.verify(token)
    clock.now += 3.0
    assert verifier.cached(token) is None
    with pytest.raises(Unavailable, match="revocations"):
        await verifier.verify(token)
    issuer.down = False
    assert (await verifier.verify(token)).subject == "u1"


async def test_the_first_verify_waits_for_the_list_and_an_issuer_down_is_unavailable() -> None:
    issuer = Issuer()
    issuer.down = True
    verifier = verifier_for(issuer, Clock())
    with pytest.raises(Unavailable):
        await verifier.verify(signed(claims()))
    assert issuer.fetches >= 1


@pytest.mark.parametrize(
    "document",
    [{DOCUMENT_MEMBER: []}, {DOCUMENT_MEMBER: {"u": "soon"}}, {DOCUMENT_MEMBER: {"u": True}},
     {DOCUMENT_MEMBER: {"u": float("nan")}}],
)  # fmt: skip
def test_a_malformed_list_is_an_error_not_an_empty_list(document: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        not_before_of(document)
    assert not_before_of({"keys": []}) == {}  # an issuer without the list revokes nobody
