"""Forged and broken JWTs are refused before the handler runs.

A spy servicer stands behind the real server pipeline; each bad token must get
UNAUTHENTICATED with the spy never called, and a good token must reach it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from tests.conftest import Running, start_server
from tests.tokens import KID, PUBLIC_RAW, b64, claims, jwks, signed


class Spy(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        self.calls += 1
        return pb.GetUserResponse(user=pb.User(name="users/spy"))


SPY = Spy()


async def mount(context: ServiceContext) -> Mount:
    return Mount(
        servicers=[(user_service_pb2_grpc.add_UserServiceServicer_to_server, SPY)], jwks=jwks
    )


def unsigned(payload: dict[str, Any]) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "at+jwt", "kid": KID}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


def hmac_with_public_key(payload: dict[str, Any]) -> str:
    # Key confusion: HS256 "signed" with the public key as the shared secret.
    header = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": KID}).encode())
    body = b64(json.dumps(payload).encode())
    import hashlib
    import hmac

    mac = hmac.new(b64(PUBLIC_RAW).encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(mac)}"


def rsa_signed(payload: dict[str, Any]) -> str:
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(payload, attacker, algorithm="RS256", headers={"kid": KID, "typ": "at+jwt"})


def tampered(payload: dict[str, Any]) -> str:
    header, _, signature = signed(payload).split(".")
    forged = b64(json.dumps({**payload, "scope": "user.read user.admin"}).encode())
    return f"{header}.{forged}.{signature}"


BAD_TOKENS = {
    "alg none": lambda: unsigned(claims()),
    "HS256 with the public key": lambda: hmac_with_public_key(claims()),
    "RS256 from another key": lambda: rsa_signed(claims()),
    "expired": lambda: signed(
        claims(iat=int(time.time()) - 600, nbf=int(time.time()) - 600, exp=int(time.time()) - 60)
    ),
    "nbf in the future": lambda: signed(
        claims(nbf=int(time.time()) + 600, exp=int(time.time()) + 900)
    ),
    "wrong iss": lambda: signed(claims(iss="someone-else")),
    "wrong aud": lambda: signed(claims(aud="other-api")),
    "bad signature": lambda: tampered(claims()),
    "malformed": lambda: "not.a.jwt",
    "garbage": lambda: "%%%%",
    "unknown kid": lambda: signed(claims(), kid="no-such-kid"),
    "wrong typ": lambda: signed(claims(), typ="JWT"),
    "lifetime over the maximum": lambda: signed(claims(exp=int(time.time()) + 7200)),
    "no sub": lambda: signed({k: v for k, v in claims().items() if k != "sub"}),
}


# Each token must be refused for its own fault, not for an earlier, cruder one.
EXPECTED_REASONS = {
    "alg none": "TOKEN_ALGORITHM",
    "HS256 with the public key": "TOKEN_ALGORITHM",
    "RS256 from another key": "TOKEN_ALGORITHM",
    "expired": "TOKEN_EXPIRED",
    "nbf in the future": "TOKEN_NOT_YET_VALID",
    "wrong iss": "TOKEN_INVALID",
    "wrong aud": "TOKEN_INVALID",
    "bad signature": "TOKEN_INVALID",
    "malformed": "TOKEN_MALFORMED",
    "garbage": "TOKEN_MALFORMED",
    "unknown kid": "UNKNOWN_KID",
    "wrong typ": "TOKEN_TYPE",
    "lifetime over the maximum": "TOKEN_LIFETIME",
    "no sub": "TOKEN_INVALID",
}


@pytest.fixture(scope="module")
async def spy_server(
    new_database: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    empty: Path = tmp_path_factory.mktemp("no-migrations")
    spec = ServiceSpec(
        name="user",
        services=(pb.DESCRIPTOR.services_by_name["UserService"],),
        migrations=empty,
        mount=mount,
    )
    running = await start_server([spec], new_database, jwt_max_lifetime_s=3600)
    yield running
    await running.server.stop(0.5)


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_token_is_unauthenticated_and_handler_not_called(
    spy_server: Running, case: str
) -> None:
    before = SPY.calls
    async with spy_server.channel() as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUser(
                pb.GetUserRequest(name="users/me"),
                metadata=(("authorization", f"Bearer {BAD_TOKENS[case]()}"),),
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
    assert SPY.calls == before
    status = rpc_status.from_call(caught.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == EXPECTED_REASONS[case], "refused, but for the wrong reason"


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Basic dXNlcjpwdw=="),), (("authorization", "Bearer "),)]
)
async def test_missing_credentials_are_unauthenticated(
    spy_server: Running, metadata: tuple[Any, ...]
) -> None:
    before = SPY.calls
    async with spy_server.channel() as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert SPY.calls == before


async def test_good_token_reaches_the_handler(spy_server: Running) -> None:
    before = SPY.calls
    async with spy_server.channel() as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        reply = await stub.GetUser(
            pb.GetUserRequest(name="users/me"),
            metadata=(("authorization", f"Bearer {signed(claims())}"),),
        )
    assert reply.user.name == "users/spy"
    assert SPY.calls == before + 1
