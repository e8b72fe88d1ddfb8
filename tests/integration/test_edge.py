"""Through the real edge: `aimesh up` with Envoy in front, as a REST, gRPC-Web or gRPC
client meets it.

One platform serves the whole module (its start is most of the cost). Two settings are
shrunk so that tests take seconds: the user service publishes a rotated key 8 s before
it signs, and the edge caches the JWKS for 2 s (deployed: 300 s and 60 s, the same
margin in proportion). Tests that exhaust a rate limit run last.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import jwt
import pytest

from aimesh.chat.v1 import chat_service_pb2 as chat_pb
from aimesh.recommend.v1 import recommend_service_pb2 as rec_pb
from aimesh.recommend.v1 import recommend_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2 as user_pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_cli import edge
from aimesh_cli.local import free_port_offset, service_url
from tests.conftest import ROOT, require
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.integration.test_local_platform import start_up, stop_up
from tests.integration.test_token_attacks import BAD_TOKENS

pytestmark = pytest.mark.timeout(300)

DASHBOARD = ROOT / "services" / "aimesh_runtime" / "grafana" / "aimesh.json"
NO_GPU = not Path("/dev/nvidia0").exists()
BASE = {"user": 50051, "search": 50052, "recommend": 50053, "recommend-v2": 50056}
ANONYMOUS_RPS, ANONYMOUS_BURST = 5, 20


@dataclass
class Platform:
    offset: int
    state: Path
    admin_token: str

    def port(self, name: str) -> int:
        return {"edge": 8080, "edge-admin": 9901, "prometheus": 9090, **BASE}[name] + self.offset

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port('edge')}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port('edge')}"


@pytest.fixture(scope="module")
def fake_model() -> Iterator[str]:
    """The fake Anthropic endpoint, on a loop of its own: it must answer between tests."""
    loop = asyncio.new_event_loop()
    started: list[str] = []
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        fake = loop.run_until_complete(FakeAnthropic().start())
        started.append(fake.base_url)
        ready.set()
        loop.run_forever()
        # Stopped by the fixture: close the server and the loop in this thread, so no
        # socket or loop is left for the garbage collector to warn about in a later test.
        loop.run_until_complete(fake.stop())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield started[0]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, fake_model: str) -> Iterator[Platform]:
    binary = edge.envoy_binary()
    problem = "no Envoy binary" if binary is None else edge.envoy_runs(binary)
    require(not problem, f"a runnable Envoy for the edge tests ({problem})")
    state = tmp_path_factory.mktemp("edge-state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}
    env.update(
        AIMESH_STATE_DIR=str(state),
        AIMESH_USER_KEY_PUBLISH_LEAD_S="8",
        AIMESH_EDGE_JWKS_CACHE_S="2",
        AIMESH_RATE_LIMIT_ANONYMOUS_RPS=str(ANONYMOUS_RPS),
        AIMESH_RATE_LIMIT_ANONYMOUS_BURST=str(ANONYMOUS_BURST),
        AIMESH_OBSERVE_SCRAPE_S="1",
        # A model trains on a handful of interactions and is served within a second.
        AIMESH_RECOMMEND_MIN_INTERACTIONS="4",
        AIMESH_RECOMMEND_MIN_USERS="2",
        AIMESH_RECOMMEND_REFRESH_S="1",
        AIMESH_CHAT_ANTHROPIC_BASE_URL=fake_model,
        ANTHROPIC_API_KEY="sk-ant-fake",
    )
    for attempt in range(3):
        # The shifted ports sit in the ephemeral range: another program may take one
        # between choosing the offset and binding it; then choose again.
        offset = free_port_offset(start=4000 + 111 * attempt)
        env["AIMESH_PORT_OFFSET"] = str(offset)
        try:
            process, banner = start_up(env, "--observe")
            break
        except AssertionError as error:
            if "Address already in use" not in str(error) or attempt == 2:
                raise
    try:
        assert f"http://localhost:{8080 + offset}" in banner, banner
        token = next(
            line.split("TOKEN=", 1)[1].strip()
            for line in banner.splitlines()
            if "export TOKEN=" in line
        )
        assert (state / "logs" / "edge.log").exists()
        yield Platform(offset, state, token)
    finally:
        stop_up(process)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
async def http(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as client:
        yield client


async def user_db(platform: Platform) -> asyncpg.Connection:
    """The user service's database, found as `aimesh up` left it (embedded server)."""
    lines = (platform.state / "pgdata" / "postmaster.pid").read_text().splitlines()
    port, socket_dir = lines[3].strip(), lines[4].strip()
    secrets = json.loads((platform.state / "secrets.json").read_text())
    admin = f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"
    return await asyncpg.connect(service_url(admin, "user", secrets["role_passwords"]["user"]))


class Minter:
    """Signs tokens with the platform's own live keys (as the user service would), for
    subjects and claims a test chooses."""

    def __init__(self, platform: Platform) -> None:
        self._platform = platform

    async def mint(self, claims: list[dict[str, Any]]) -> list[str]:
        from aimesh_runtime.config import key_bytes
        from aimesh_user.signing import KeyRing
        from aimesh_user.store import UserStore

        secrets = json.loads((self._platform.state / "secrets.json").read_text())
        connection = await user_db(self._platform)
        pool = _OneConnection(connection)
        try:
            ring = KeyRing(
                UserStore(pool),  # type: ignore[arg-type]
                key_bytes(secrets["key_encryption_key"], "kek"),
                issuer="aimesh-user",
                audience="aimesh",
                access_ttl_s=900,
                rotation_s=86_400 * 30,
            )
            await ring.load()
            return [ring.mint(c.pop("sub"), c.pop("scopes"), c) for c in claims]
        finally:
            await connection.close()


class _OneConnection:
    """Enough of asyncpg.Pool for UserStore's key reads."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def variant_of(subject: str, v2_percent: int) -> str:
    """The edge's assignment (the Lua of gateway_envoy/envoy.yaml), written again:
    FNV-1a 32 of the subject, murmur3's finaliser, then a bucket out of 100."""
    h = 2166136261
    for byte in subject.encode():
        h = ((h ^ byte) * 16777619) % 2**32
    h = ((h ^ (h >> 16)) * 2246822507) % 2**32
    h = ((h ^ (h >> 13)) * 3266489909) % 2**32
    h ^= h >> 16
    return "v2" if h % 100 < v2_percent else "v1"


def user_requests(platform: Platform, method: str, refused: bool = False) -> float:
    """The user service's count of completed `method` calls (only those it refused:
    other processes call GetUser with good tokens in the background)."""
    text = httpx.get(f"http://127.0.0.1:{platform.port('user') + 1000}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("aimesh_rpc_server_requests_total{"):
            continue
        if f'grpc_method="{method}"' in line and not (refused and 'grpc_code="OK"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


# REST/JSON


async def register_and_login(http: httpx.AsyncClient) -> tuple[str, str]:
    email, password = f"edge-{uuid.uuid4().hex[:8]}@example.com", "a long edge password 42"
    body = {"email": email, "password": password}
    registered = await http.post("/v1/users:register", json=body)
    assert registered.status_code == 200, registered.text
    login = await http.post("/v1/users:login", json=body)
    assert login.status_code == 200, login.text
    return login.json()["accessToken"], login.json()["user"]["name"]


async def test_rest_reaches_every_service_and_maps_statuses(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    token, name = await register_and_login(http)
    me = await http.get("/v1/users/me", headers=bearer(token))
    assert me.status_code == 200 and me.json()["user"]["name"] == name
    admin = bearer(platform.admin_token)

    # search: create a collection, upsert, search.
    collection = f"edge{uuid.uuid4().hex[:8]}"
    created = await http.post(
        f"/v1/collections?collectionId={collection}", json={"displayName": "edge"}, headers=admin
    )
    assert created.status_code == 200, created.text
    upserted = await http.post(
        f"/v1/collections/{collection}/documents:batchUpsert",
        json={
            "documents": [
                {"name": f"collections/{collection}/documents/cats", "text": "Cats purr."},
                {"name": f"collections/{collection}/documents/orbit", "text": "Rockets fly."},
            ]
        },
        headers=admin,
    )
    assert upserted.status_code == 200, upserted.text
    found = await http.post(
        f"/v1/collections/{collection}/documents:search",
        json={"query": "a kitten", "topK": 1},
        headers=admin,
    )
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["document"].endswith("/cats")

    # recommend: items, interactions, recommendations.
    items = await http.post(
        "/v1/items:batchUpsert",
        json={
            "items": [{"name": "items/edge-a", "text": "a"}, {"name": "items/edge-b", "text": "b"}]
        },
        headers=admin,
    )
    assert items.status_code == 200, items.text
    recorded = await http.post(
        "/v1/interactions:batchRecord",
        json={
            "interactions": [
                {
                    "interactionId": uuid.uuid4().hex,
                    "user": name,
                    "item": "items/edge-a",
                    "kind": "INTERACTION_KIND_CLICK",
                }
            ]
        },
        headers=bearer(token),
    )
    assert recorded.status_code == 200, recorded.text
    recommended = await http.post(
        "/v1/items:recommend", json={"user": "users/me", "k": 2}, headers=bearer(token)
    )
    assert recommended.status_code == 200, recommended.text
    assert recommended.json()["modelVersion"] in ("v1", "v2")

    # chat: the answer streams as a JSON array of StreamChatResponse.
    conversation = await http.post("/v1/conversations", json={}, headers=bearer(token))
    assert conversation.status_code == 200, conversation.text
    conversation_name = conversation.json()["conversation"]["name"]
    chunks = []
    async with http.stream(
        "POST",
        f"/v1/{conversation_name}:streamChat",
        json={"message": "hello"},
        headers=bearer(token),
    ) as streamed:
        assert streamed.status_code == 200
        async for chunk in streamed.aiter_bytes():
            chunks.append(chunk)
    messages = json.loads(b"".join(chunks))
    assert isinstance(messages, list) and "start" in messages[0] and "finish" in messages[-1]

    # notify: a webhook subscription, an event, its delivery listed.
    receiver = await WebhookReceiver().start()
    subscribed = await http.post(
        "/v1/subscriptions",
        json={"topics": ["edge.tested"], "webhook": {"url": receiver.url("/hook")}},
        headers=admin,
    )
    assert subscribed.status_code == 200, subscribed.text
    receiver.secrets["/hook"] = [subscribed.json()["secret"]]
    subscription = subscribed.json()["subscription"]["name"]
    published = await http.post(
        "/v1/events:publish",
        json={
            "topic": "edge.tested",
            "idempotencyKey": uuid.uuid4().hex,
            "payload": base64.b64encode(b'{"ok": true}').decode(),
        },
        headers=admin,
    )
    assert published.status_code == 200, published.text
    await receiver.wait_for(lambda: bool(receiver.accepted))
    deliveries = await http.get(f"/v1/{subscription}/deliveries", headers=admin)
    assert deliveries.status_code == 200 and deliveries.json()["deliveries"], deliveries.text

    # Errors: the services' and the edge's own, all google.rpc.Status JSON.
    for response, http_status, code in (
        (await http.get(f"/v1/collections/nope{uuid.uuid4().hex[:6]}", headers=admin), 404, 5),
        (
            await http.post(
                "/v1/items:recommend", json={"user": "users/me", "k": 0}, headers=bearer(token)
            ),
            400,
            3,
        ),
        (await http.get("/v1/users", headers=bearer(token)), 403, 7),
        (await http.get("/v1/users/me"), 401, 16),
        (await http.get("/v1/users/me", headers=bearer("x.y.z")), 401, 16),
        (await http.get("/no/such/path"), 404, 5),
    ):
        assert response.status_code == http_status, (response.request.url, response.text)
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["code"] == code and isinstance(body["message"], str), body


# gRPC-Web and gRPC


def grpc_web_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """The data frames and the trailers of a grpc-web response body."""
    messages, trailers, at = [], {}, 0
    while at < len(body):
        flag, length = body[at], struct.unpack(">I", body[at + 1 : at + 5])[0]
        payload = body[at + 5 : at + 5 + length]
        at += 5 + length
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


async def test_grpc_web_unary_streaming_and_preflight(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    origin = {"origin": "http://localhost:3000"}
    web = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **origin}
    preflight = await http.options(
        "/aimesh.user.v1.UserService/GetUser",
        headers={
            **origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,x-grpc-web",
        },
    )
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    unary = await http.post(
        "/aimesh.user.v1.UserService/GetUser",
        content=grpc_web_frame(user_pb.GetUserRequest(name="users/me").SerializeToString()),
        headers={**web, **bearer(platform.admin_token)},
    )
    assert unary.status_code == 200, unary.text
    messages, trailers = grpc_web_frames(unary.content)
    assert trailers.get("grpc-status", unary.headers.get("grpc-status")) == "0"
    assert user_pb.GetUserResponse.FromString(messages[0]).user.email

    conversation = await http.post(
        "/v1/conversations", json={}, headers=bearer(platform.admin_token)
    )
    name = conversation.json()["conversation"]["name"]
    request = chat_pb.StreamChatRequest(conversation=name, message="hi")
    streamed = await http.post(
        "/aimesh.chat.v1.ChatService/StreamChat",
        content=grpc_web_frame(request.SerializeToString()),
        headers={**web, **bearer(platform.admin_token)},
    )
    assert streamed.status_code == 200
    messages, trailers = grpc_web_frames(streamed.content)
    assert trailers["grpc-status"] == "0", trailers
    replies = [chat_pb.StreamChatResponse.FromString(m) for m in messages]
    assert len(replies) >= 3
    assert replies[0].HasField("start") and replies[-1].HasField("finish")

    refused = await http.post(
        "/aimesh.user.v1.UserService/GetUser",
        content=grpc_web_frame(user_pb.GetUserRequest(name="users/me").SerializeToString()),
        headers=web,
    )
    assert refused.headers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])


async def test_native_grpc_through_the_edge(platform: Platform) -> None:
    async with grpc.aio.insecure_channel(platform.target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        reply = await stub.GetUser(
            user_pb.GetUserRequest(name="users/me"),
            metadata=tuple(bearer(platform.admin_token).items()),
        )
        assert reply.user.email
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUser(user_pb.GetUserRequest(name="users/me"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# Tokens


async def test_bad_tokens_are_refused_at_the_edge(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    now = int(time.time())
    real_key_faults = {
        "expired (real key)": {"iat": now - 600, "nbf": now - 600, "exp": now - 60},
        "nbf in the future (real key)": {"nbf": now + 600, "exp": now + 900},
        "wrong iss (real key)": {"iss": "someone-else"},
        "wrong aud (real key)": {"aud": "other-api"},
        "lifetime over the maximum (real key)": {"iat": now, "exp": now + 7200},
    }
    minted = await Minter(platform).mint(
        [{"sub": "attacker", "scopes": ["user.read"], **f} for f in real_key_faults.values()]
    )
    tokens = {name: make() for name, make in BAD_TOKENS.items()}
    tokens.update(zip(real_key_faults, minted, strict=True))
    reached = []
    async with grpc.aio.insecure_channel(platform.target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        for name, token in tokens.items():
            before = user_requests(platform, "GetUser", refused=True)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetUser(
                    user_pb.GetUserRequest(name="users/me"), metadata=tuple(bearer(token).items())
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            rest = await http.get("/v1/users/me", headers=bearer(token))
            assert rest.status_code == 401 and rest.json()["code"] == 16, (name, rest.text)
            if user_requests(platform, "GetUser", refused=True) != before:
                reached.append(name)
    assert not reached, "refused by the service, not at the edge"


async def test_key_rotation_has_no_401_window(platform: Platform) -> None:
    """A rotated-in key is cached at the edge before it signs: every token passes."""
    admin = tuple(bearer(platform.admin_token).items())
    secrets = json.loads((platform.state / "secrets.json").read_text())
    login = user_pb.LoginRequest(email=secrets["admin_email"], password=secrets["admin_password"])
    async with grpc.aio.insecure_channel(platform.target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        rotated = await stub.RotateSigningKey(user_pb.RotateSigningKeyRequest(), metadata=admin)
        kids = set()
        deadline = time.monotonic() + 60
        while rotated.kid not in kids:
            assert time.monotonic() < deadline, "the new key never signed"
            token = (await stub.Login(login)).access_token
            kids.add(jwt.get_unverified_header(token)["kid"])
            # Fails with UNAUTHENTICATED if the edge does not know the signing key yet.
            await stub.GetUser(
                user_pb.GetUserRequest(name="users/me"), metadata=tuple(bearer(token).items())
            )
            await asyncio.sleep(0.5)  # the anonymous limit: logins from one address
        assert rotated.previous_kid in kids  # tokens signed before the switch passed too
        await stub.GetUser(user_pb.GetUserRequest(name="users/me"), metadata=admin)


# The A/B split


async def test_ab_split_is_sticky_per_user_with_the_configured_share(platform: Platform) -> None:
    v2_percent = edge.variant_weights()["v2"]
    subjects = [f"ab-user-{n:03d}" for n in range(400)]
    tokens = await Minter(platform).mint(
        [{"sub": s, "scopes": ["recommend.read"]} for s in subjects]
    )
    served: dict[str, set[str]] = {s: set() for s in subjects}
    calls: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(platform.target) as channel:
        stub = recommend_service_pb2_grpc.RecommendServiceStub(channel)
        gate = asyncio.Semaphore(16)

        async def call(subject: str, token: str) -> None:
            async with gate:
                reply = await stub.Recommend(
                    rec_pb.RecommendRequest(user="users/me", k=1),
                    metadata=tuple(bearer(token).items()),
                )
            served[subject].add(reply.model_version)
            calls[reply.model_version] += 1

        # One call to each process first: a service that has not seen the rotated-in key
        # fetches the JWKS once, and calls arriving together meanwhile are refused.
        for variant in ("v1", "v2"):
            await stub.Recommend(
                rec_pb.RecommendRequest(user="users/me", k=1),
                metadata=(*bearer(tokens[0]).items(), ("x-aimesh-variant", variant)),
            )
        await asyncio.gather(
            *(call(s, t) for _ in range(5) for s, t in zip(subjects, tokens, strict=True))
        )
        # x-aimesh-variant: v2 forces v2, even for a v1 user.
        v1_user = next(i for i, s in enumerate(subjects) if variant_of(s, v2_percent) == "v1")
        forced = await stub.Recommend(
            rec_pb.RecommendRequest(user="users/me", k=1),
            metadata=(*bearer(tokens[v1_user]).items(), ("x-aimesh-variant", "v2")),
        )
        assert forced.model_version == "v2"
    assert all(len(versions) == 1 for versions in served.values()), "a user met both versions"
    assert {s: v.pop() for s, v in served.items()} == {
        s: variant_of(s, v2_percent) for s in subjects
    }
    assert calls.total() == 2000
    assert abs(calls["v2"] / calls.total() * 100 - v2_percent) <= 3, calls


# Prometheus


async def test_prometheus_runs_every_dashboard_query_with_data(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    require(shutil.which("prometheus") is not None, "prometheus on PATH (Debian package)")
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {
        f"{panel['title']}: {target['expr']}": target["expr"].replace("$__rate_interval", "20s")
        for panel in dashboard["panels"]
        for target in panel["targets"]
        if not (NO_GPU and "gpu" in target["expr"])
    }
    admin = bearer(platform.admin_token)
    me = (await http.get("/v1/users/me", headers=admin)).json()["user"]["name"]
    # A trained v1 model, so that recommendations are scored in batches.
    await http.post(
        "/v1/items:batchUpsert",
        json={"items": [{"name": f"items/load-{n}", "text": f"item {n}"} for n in range(3)]},
        headers=admin,
    )
    interactions = [
        {"interactionId": uuid.uuid4().hex, "user": user, "item": f"items/load-{n}"}
        for user in (me, "users/load-other")
        for n in range(3)
    ]
    for interaction in interactions:
        interaction["kind"] = "INTERACTION_KIND_CLICK"
    recorded = await http.post(
        "/v1/interactions:batchRecord", json={"interactions": interactions}, headers=admin
    )
    assert recorded.status_code == 200, recorded.text
    job = await http.post(
        f"/v1/trainingJobs?trainingJobId=load{uuid.uuid4().hex[:8]}",
        json={"trainingJob": {"modelVersion": "v1", "epochs": 1}},
        headers={**admin, "x-aimesh-variant": "v1"},
    )
    assert job.status_code == 200, job.text
    receiver = await WebhookReceiver().start()
    subscribed = await http.post(
        "/v1/subscriptions",
        json={"topics": ["edge.load"], "webhook": {"url": receiver.url("/load")}},
        headers=admin,
    )
    receiver.secrets["/load"] = [subscribed.json()["secret"]]
    collection = f"load{uuid.uuid4().hex[:8]}"
    await http.post(f"/v1/collections?collectionId={collection}", json={}, headers=admin)
    conversation = (await http.post("/v1/conversations", json={}, headers=admin)).json()
    stop = asyncio.Event()

    async def load() -> None:
        """A little of everything the dashboard shows, errors included."""
        n = 0
        while not stop.is_set():
            n += 1
            for variant in ("v1", "v2"):
                # A user the v1 model knows, with a new interaction that empties its cached
                # answer: v1 scores it (in a batch) once its model is loaded.
                fresh = {
                    "interactionId": uuid.uuid4().hex,
                    "user": "users/load-other",
                    "item": f"items/load-{n % 3}",
                    "kind": "INTERACTION_KIND_CLICK",
                }
                pinned = {**admin, "x-aimesh-variant": variant}
                await http.post(
                    "/v1/interactions:batchRecord", json={"interactions": [fresh]}, headers=pinned
                )
                await http.post(
                    "/v1/items:recommend",
                    json={"user": "users/load-other", "k": 2},
                    headers=pinned,
                )
            await http.post(
                f"/v1/collections/{collection}/documents:search",
                json={"query": f"load query {n}"},
                headers=admin,
            )
            await http.post(
                f"/v1/{conversation['conversation']['name']}:streamChat",
                json={"message": f"hello {n}"},
                headers=admin,
            )
            await http.post(
                "/v1/events:publish",
                json={"topic": "edge.load", "idempotencyKey": uuid.uuid4().hex, "payload": ""},
                headers=admin,
            )
            await http.get("/v1/collections/missing", headers=admin)  # NOT_FOUND

    loader = asyncio.create_task(load())
    api = f"http://127.0.0.1:{platform.port('prometheus')}/api/v1/query"
    empty: list[str] = list(queries)
    deadline = time.monotonic() + 120
    try:
        while empty and time.monotonic() < deadline:
            await asyncio.sleep(1)
            still = []
            for name in empty:
                answer = (await http.get(api, params={"query": queries[name]})).json()
                assert answer["status"] == "success", (name, answer)  # it parses
                if not answer["data"]["result"]:
                    still.append(name)
            empty = still
    finally:
        stop.set()
        await loader
    assert not empty, f"no data for: {empty}"
    edge_up = (await http.get(api, params={"query": 'up{job="edge"}'})).json()
    assert edge_up["data"]["result"][0]["value"][1] == "1"


# Limits (last: they leave buckets empty)


async def test_edge_rate_limit_answers_429_and_resource_exhausted(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    # No route and no token needed, so only the edge's bucket (2000, +1000/s) is spent.
    async with grpc.aio.insecure_channel(platform.target) as channel:
        call = channel.unary_unary("/nothing.v1.Nothing/Call")

        async def one() -> grpc.StatusCode:
            try:
                await call(b"", timeout=30)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        async def rest() -> httpx.Response:
            return await http.get("/no/such/path")

        # REST calls spread through the burst, so most of them meet an empty bucket.
        calls = [rest() if n % 40 == 0 else one() for n in range(8000)]
        results = await asyncio.gather(*calls)
    codes = Counter(r for r in results if isinstance(r, grpc.StatusCode))
    limited = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 429]
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0, codes
    assert limited, "no REST call was limited during the burst"
    assert all(r.json()["code"] == 8 for r in limited)


async def test_forged_forwarded_for_does_not_pick_a_rate_limit_bucket(
    platform: Platform,
) -> None:
    """Anonymous calls are limited per client address; a client naming its own address in
    X-Forwarded-For still lands in its real one (the edge's entry, right-most)."""
    async with grpc.aio.insecure_channel(platform.target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)

        async def one(n: int) -> grpc.StatusCode:
            forged = (("x-forwarded-for", f"198.51.100.{n % 250}"),)
            try:
                await stub.GetJwks(user_pb.GetJwksRequest(), metadata=forged)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        codes = Counter(await asyncio.gather(*(one(n) for n in range(3 * ANONYMOUS_BURST))))
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0, codes
