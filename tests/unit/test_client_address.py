"""The client address behind the edge: the entry the edge appended, never the client's own."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from aimesh_runtime.metrics import RpcMetrics
from aimesh_runtime.pipeline import ServerPipeline
from aimesh_runtime.ratelimit import RateLimiter


class Peer:
    def peer(self) -> str:
        return "ipv4:10.0.0.9:41234"  # the edge's own address, as the service sees it


def pipeline(trust: bool, hops: int = 1) -> ServerPipeline:
    return ServerPipeline(
        policies={},
        metrics=RpcMetrics(CollectorRegistry()),
        tracer=trace.NoOpTracer(),
        verifier=None,
        api_keys=None,
        limiter=RateLimiter(1.0, 1),
        trust_forwarded_for=trust,
        trusted_proxy_hops=hops,
    )


def client(chosen: ServerPipeline, forwarded: str | None) -> str:
    metadata = {} if forwarded is None else {"x-forwarded-for": forwarded}
    context: Any = Peer()
    return chosen._client(metadata, context)


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),  # the edge appended the only entry
        ("1.2.3.4, 203.0.113.7", "203.0.113.7"),  # the client forged the first
        ("1.2.3.4,5.6.7.8 , 203.0.113.7", "203.0.113.7"),
        (None, "ipv4:10.0.0.9"),
        ("", "ipv4:10.0.0.9"),
    ],
)
def test_behind_one_proxy_the_right_most_entry_is_the_client(
    forwarded: str | None, expected: str
) -> None:
    assert client(pipeline(trust=True), forwarded) == expected


def test_two_trusted_hops_take_the_second_from_the_right() -> None:
    chosen = pipeline(trust=True, hops=2)
    assert client(chosen, "1.2.3.4, 203.0.113.7, 10.1.1.1") == "203.0.113.7"
    assert client(chosen, "10.1.1.1") == "ipv4:10.0.0.9"  # fewer entries than proxies


def test_untrusted_header_is_ignored() -> None:
    assert client(pipeline(trust=False), "1.2.3.4") == "ipv4:10.0.0.9"
