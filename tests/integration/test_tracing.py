"""One chat request, one trace: every hop's spans reach a real OTLP gRPC receiver.

The receiver implements opentelemetry.proto's TraceService on a grpc server, so
the services' own OTLP exporters talk to it exactly as to a collector. It is a
threaded server, not an aio one: a service flushes its spans when it stops, from
the event loop, and the receiver must answer while that loop waits.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from aimesh.chat.v1 import chat_service_pb2 as chat_pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2_grpc
from tests.conftest import ROOT, Running, admin_token, bearer, start_server

CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
JWKS = "GET /.well-known/jwks.json"
SEARCH = "aimesh.search.v1.SearchService/Search"
STREAM_CHAT = "aimesh.chat.v1.ChatService/StreamChat"


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A collector's trace endpoint: keeps every span with its service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self.address = ""
        self._server: grpc.Server | None = None

    def start(self) -> OtlpReceiver:
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((attributes.get("service.name", ""), span))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver().start()
    yield found
    found.stop()


@dataclass
class Stack:
    user: Running
    search: Running
    chat: Running
    token: str
    conversation: str


@pytest.fixture(scope="module")
async def stack(new_database: Any, receiver: OtlpReceiver) -> AsyncIterator[Stack]:
    """user, search and chat exporting to the receiver, with a collection and a conversation."""
    from aimesh_chat.server import SPEC as CHAT
    from aimesh_search.server import SPEC as SEARCH_SPEC
    from aimesh_user.server import SPEC as USER

    otlp = {"AIMESH_OTLP_ENDPOINT": receiver.address}
    user = await start_server([USER], new_database, extra_env=otlp)
    jwks_url = f"http://127.0.0.1:{user.http_port}/.well-known/jwks.json"
    peers = {"AIMESH_JWKS_URL": jwks_url, "AIMESH_USER_ADDRESS": user.address}
    started: list[Running] = [user]
    try:
        async with user.channel() as channel:
            token = await admin_token(user_service_pb2_grpc.UserServiceStub(channel))
        # Data first, through servers that are then replaced: the traced ones start
        # with no keys cached, so the request under test verifies its token against
        # the JWKS in both chat and search, as the first request after a deploy does.
        search = await start_server([SEARCH_SPEC], new_database, extra_env=peers)
        async with search.channel() as channel:
            stub = search_service_pb2_grpc.SearchServiceStub(channel)
            await stub.CreateCollection(
                search_pb.CreateCollectionRequest(
                    collection_id="bakery", collection=search_pb.Collection()
                ),
                metadata=bearer(token),
            )
            await stub.UpsertDocuments(
                search_pb.UpsertDocumentsRequest(
                    parent="collections/bakery",
                    documents=[
                        search_pb.Document(
                            name="collections/bakery/documents/bread",
                            text="Bread is baked from flour, water, yeast and salt.",
                        )
                    ],
                ),
                metadata=bearer(token),
            )
        await search.server.stop(0.5)
        chat_env = {**peers, "AIMESH_SEARCH_ADDRESS": search.address}
        chat = await start_server([CHAT], new_database, extra_env=chat_env)
        async with chat.channel() as channel:
            reply = await chat_service_pb2_grpc.ChatServiceStub(channel).CreateConversation(
                chat_pb.CreateConversationRequest(
                    conversation=chat_pb.Conversation(display_name="t")
                ),
                metadata=bearer(token),
            )
        await chat.server.stop(0.5)

        search = await start_server(
            [SEARCH_SPEC], new_database, extra_env={**search.environ, **otlp}
        )
        started.append(search)
        chat_env = {**chat.environ, **otlp, "AIMESH_SEARCH_ADDRESS": search.address}
        chat = await start_server([CHAT], new_database, extra_env=chat_env)
        started.append(chat)
        yield Stack(user, search, chat, token, reply.conversation.name)
    finally:
        for running in reversed(started):
            await running.server.stop(0.5)


async def test_a_chat_request_is_one_trace_across_every_hop(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    trace_id, root_span = os.urandom(16).hex(), os.urandom(8).hex()
    async with stack.chat.channel() as channel:
        events = [
            event
            async for event in chat_service_pb2_grpc.ChatServiceStub(channel).StreamChat(
                chat_pb.StreamChatRequest(
                    conversation=stack.conversation,
                    message="What is bread made of?",
                    collection="collections/bakery",
                ),
                metadata=(*bearer(stack.token), ("traceparent", f"00-{trace_id}-{root_span}-01")),
                timeout=20,
            )
        ]
    assert any(e.WhichOneof("event") == "citations" for e in events), events
    # The server span ends just after the last message reaches the client.
    for _ in range(50):
        for running in (stack.chat, stack.search, stack.user):
            flush = running.server.tracer_provider.force_flush  # type: ignore[attr-defined]
            await asyncio.to_thread(flush)
        if any(s.name == STREAM_CHAT for _, s in receiver.spans):
            break
        await asyncio.sleep(0.1)

    spans = [(service, s) for service, s in receiver.spans if s.trace_id.hex() == trace_id]
    by_id = {s.span_id.hex(): (service, s) for service, s in spans}

    def one(service: str, name: str, kind: int, parent: str) -> str:
        found = [
            s.span_id.hex()
            for svc, s in spans
            if (svc, s.name, s.kind) == (service, name, kind) and s.parent_span_id.hex() == parent
        ]
        layout = sorted((svc, s.name, s.parent_span_id.hex()) for svc, s in spans)
        assert len(found) == 1, f"{service} {name} under {parent}: {layout}"
        return found[0]

    chat_span = one("aimesh-chat", STREAM_CHAT, SERVER, root_span)
    chat_jwks = one("aimesh-chat", JWKS, CLIENT, chat_span)
    one("aimesh-user", JWKS, SERVER, chat_jwks)
    search_call = one("aimesh-chat", SEARCH, CLIENT, chat_span)
    search_span = one("aimesh-search", SEARCH, SERVER, search_call)
    search_jwks = one("aimesh-search", JWKS, CLIENT, search_span)
    one("aimesh-user", JWKS, SERVER, search_jwks)
    # One trace, no orphans: every parent is a span of this trace or the caller's.
    for _, span in spans:
        assert span.parent_span_id.hex() in (*by_id, root_span)
    assert {service for service, _ in spans} == {"aimesh-chat", "aimesh-search", "aimesh-user"}


DASHBOARD = ROOT / "services" / "aimesh_runtime" / "grafana" / "aimesh.json"
METRIC_NAME = re.compile(r"\b(aimesh_[a-z0-9_]+)\b")


def scraped_names(text: str) -> set[str]:
    """Every series name a scrape declares or carries; a histogram declares its suffixes."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_every_metric_the_dashboard_queries_is_in_a_live_scrape(stack: Stack) -> None:
    scrapes: dict[str, str] = {}
    for name, running in (("user", stack.user), ("search", stack.search), ("chat", stack.chat)):
        url = f"http://127.0.0.1:{running.http_port}/metrics"
        scrapes[name] = await asyncio.to_thread(
            lambda url=url: urllib.request.urlopen(url, timeout=5).read().decode()
        )
    available = set().union(*(scraped_names(text) for text in scrapes.values()))
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in METRIC_NAME.findall(target["expr"])
    }
    assert len(queried) >= 10
    # Notify's are checked against its own scrape, in test_notify_service.py.
    assert {name for name in queried if not name.startswith("aimesh_notify_")} - available == set()
    # Per method rate, errors and duration come from every service.
    for name, text in scrapes.items():
        assert "aimesh_rpc_server_requests_total{" in text, name
        assert "aimesh_rpc_server_duration_seconds_bucket{" in text, name
    # The chat answer above was served by the search encoder in batches.
    assert "aimesh_search_encoder_batch_size_count" in scrapes["search"]
