"""The user service over real gRPC, with its own embedded-PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from tests.conftest import (
    Running,
    admin_token,
    bearer,
    platform_service_token,
    register_and_login,
    start_server,
)

Stub = user_service_pb2_grpc.UserServiceStub


def details_of(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """Decode the google.rpc details of a failed call by type name."""
    status = rpc_status.from_call(error)
    assert status is not None, "error carries no google.rpc.Status"
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


async def test_register_then_login_then_get_me(users: Stub) -> None:
    user, token = await register_and_login(users)
    reply = await users.GetUser(pb.GetUserRequest(name="users/me"), metadata=bearer(token))
    assert reply.user.name == user.name
    assert list(reply.user.roles) == [pb.ROLE_MEMBER]
    assert "search.read" in reply.user.scopes and "user.admin" not in reply.user.scopes


async def test_duplicate_email_is_already_exists_case_insensitive(users: Stub) -> None:
    email = f"Dup{uuid.uuid4().hex[:6]}@example.com"
    await users.Register(pb.RegisterRequest(email=email, password="a-long-password-1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.Register(pb.RegisterRequest(email=email.lower(), password="a-long-password-2"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = details_of(caught.value)["ErrorInfo"]
    assert info.reason == "EMAIL_TAKEN"  # type: ignore[attr-defined]


async def test_invalid_fields_give_field_violations(users: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.Register(pb.RegisterRequest(email="not-an-email", password="short"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = details_of(caught.value)["BadRequest"]
    fields = {v.field for v in bad_request.field_violations}  # type: ignore[attr-defined]
    assert fields == {"email", "password"}


async def test_wrong_password_and_unknown_email_look_the_same(users: Stub) -> None:
    user, _ = await register_and_login(users)
    errors = []
    for email, password in (
        (user.email, "wrong-password-xx"),
        ("nobody@example.com", "whatever-password"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await users.Login(pb.LoginRequest(email=email, password=password))
        errors.append(caught.value)
    assert {e.code() for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    assert errors[0].details() == errors[1].details() == "wrong email or password"


async def test_text_the_database_cannot_store_is_invalid_argument(users: Stub) -> None:
    # Found by fuzzing: PostgreSQL text holds no NUL, and the store's error was INTERNAL.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.Login(pb.LoginRequest(email="a\x00b@example.com", password="whatever-pass"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be stored" in (caught.value.details() or "")


async def test_unknown_user_is_not_found_for_admin(users: Stub) -> None:
    token = await admin_token(users)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.GetUser(pb.GetUserRequest(name="users/doesnotexist"), metadata=bearer(token))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_member_cannot_read_another_user(users: Stub) -> None:
    other, _ = await register_and_login(users)
    _, token = await register_and_login(users)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.GetUser(pb.GetUserRequest(name=other.name), metadata=bearer(token))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_member_lacks_scope_for_list_users(users: Stub) -> None:
    _, token = await register_and_login(users)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.ListUsers(pb.ListUsersRequest(), metadata=bearer(token))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details_of(caught.value)["ErrorInfo"].reason == "SCOPE_MISSING"  # type: ignore[attr-defined]


async def test_list_users_paginates_without_gaps_or_repeats(users: Stub) -> None:
    for _ in range(5):
        await register_and_login(users)
    token = await admin_token(users)
    seen: list[str] = []
    page_token = ""
    while True:
        page = await users.ListUsers(
            pb.ListUsersRequest(page_size=2, page_token=page_token), metadata=bearer(token)
        )
        assert len(page.users) <= 2
        seen.extend(u.name for u in page.users)
        page_token = page.next_page_token
        if not page_token:
            break
    everyone = await users.ListUsers(pb.ListUsersRequest(page_size=1000), metadata=bearer(token))
    assert seen == [u.name for u in everyone.users]
    assert len(seen) == len(set(seen)) >= 6


async def test_negative_page_size_and_bad_token_are_invalid(users: Stub) -> None:
    token = await admin_token(users)
    for request in (pb.ListUsersRequest(page_size=-1), pb.ListUsersRequest(page_token="%%%")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await users.ListUsers(request, metadata=bearer(token))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update_user_fields_and_roles_need_admin(users: Stub) -> None:
    user, token = await register_and_login(users)
    reply = await users.UpdateUser(
        pb.UpdateUserRequest(
            user=pb.User(name="users/me", display_name="Ada"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=bearer(token),
    )
    assert reply.user.display_name == "Ada" and reply.user.email == user.email
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(name="users/me", roles=[pb.ROLE_ADMIN]),
                update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
            ),
            metadata=bearer(token),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(name="users/me"),
                update_mask=field_mask_pb2.FieldMask(paths=["password"]),
            ),
            metadata=bearer(token),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_user_then_not_found(users: Stub) -> None:
    user, token = await register_and_login(users)
    await users.DeleteUser(pb.DeleteUserRequest(name="users/me"), metadata=bearer(token))
    admin = await admin_token(users)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.GetUser(pb.GetUserRequest(name=user.name), metadata=bearer(admin))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_api_key_shown_once_works_until_revoked(users: Stub) -> None:
    _, token = await register_and_login(users)
    created = await users.CreateApiKey(
        pb.CreateApiKeyRequest(
            parent="users/me", api_key=pb.ApiKey(display_name="ci", scopes=["user.read"])
        ),
        metadata=bearer(token),
    )
    assert created.key.startswith(created.api_key.prefix + "_")
    listed = await users.ListApiKeys(
        pb.ListApiKeysRequest(parent="users/me"), metadata=bearer(token)
    )
    assert [k.name for k in listed.api_keys] == [created.api_key.name]
    assert created.key not in str(listed)
    me = await users.GetUser(
        pb.GetUserRequest(name="users/me"), metadata=(("x-api-key", created.key),)
    )
    assert me.user.name == created.api_key.name.split("/apiKeys/")[0]
    # The key carries only user.read, so writes through it are refused.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.DeleteUser(
            pb.DeleteUserRequest(name="users/me"), metadata=(("x-api-key", created.key),)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await users.RevokeApiKey(
        pb.RevokeApiKeyRequest(name=created.api_key.name), metadata=bearer(token)
    )
    for call in (
        users.GetUser(pb.GetUserRequest(name="users/me"), metadata=(("x-api-key", created.key),)),
        users.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=created.key)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_api_key_cannot_exceed_owner_scopes(users: Stub) -> None:
    _, token = await register_and_login(users)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.CreateApiKey(
            pb.CreateApiKeyRequest(
                parent="users/me", api_key=pb.ApiKey(display_name="x", scopes=["user.admin"])
            ),
            metadata=bearer(token),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = details_of(caught.value)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert [v.field for v in violations] == ["api_key.scopes"]


async def test_exchanged_token_carries_key_scopes(users: Stub) -> None:
    _, token = await register_and_login(users)
    created = await users.CreateApiKey(
        pb.CreateApiKeyRequest(
            parent="users/me", api_key=pb.ApiKey(display_name="ro", scopes=["search.read"])
        ),
        metadata=bearer(token),
    )
    exchanged = await users.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=created.key))
    claims = jwt.decode(exchanged.access_token, options={"verify_signature": False})
    assert claims["scope"] == "search.read"
    assert exchanged.access_token_ttl.seconds == 900


async def test_refresh_rotates_and_reuse_revokes_family(users: Stub) -> None:
    email = f"r{uuid.uuid4().hex[:8]}@example.com"
    await users.Register(pb.RegisterRequest(email=email, password="a-long-password-1"))
    login = await users.Login(pb.LoginRequest(email=email, password="a-long-password-1"))
    first = await users.RefreshToken(pb.RefreshTokenRequest(refresh_token=login.refresh_token))
    assert first.refresh_token != login.refresh_token
    second = await users.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token))
    # Presenting a used token again looks like theft: it and every live one die.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.RefreshToken(pb.RefreshTokenRequest(refresh_token=second.refresh_token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_jwks_over_grpc_and_http_match(users: Stub, user_server: Running) -> None:
    reply = await users.GetJwks(pb.GetJwksRequest())
    url = f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=5) as response:
        document = json.load(response)
    assert [k["kid"] for k in document["keys"]] == [k.kid for k in reply.keys]
    assert {k.alg for k in reply.keys} == {"EdDSA"} and {k.crv for k in reply.keys} == {"Ed25519"}


async def test_rotation_publishes_the_new_key_before_it_signs(users: Stub) -> None:
    admin = await admin_token(users)
    _, old_token = await register_and_login(users)
    rotated = await users.RotateSigningKey(pb.RotateSigningKeyRequest(), metadata=bearer(admin))
    kids = [k.kid for k in (await users.GetJwks(pb.GetJwksRequest())).keys]
    assert rotated.kid in kids and rotated.previous_kid in kids
    lead = rotated.activate_time.ToDatetime() - rotated.previous_retire_time.ToDatetime()
    assert lead.total_seconds() < 0, "the previous key outlives the new key's activation"
    # Within the publish lead (300 s by default) tokens still carry the previous key.
    _, new_token = await register_and_login(users)
    assert jwt.get_unverified_header(new_token)["kid"] == rotated.previous_kid
    await users.GetUser(pb.GetUserRequest(name="users/me"), metadata=bearer(old_token))


async def test_rotated_key_signs_after_the_lead_and_old_tokens_still_verify(
    new_database: Any,
) -> None:
    from aimesh_user.server import SPEC

    running = await start_server(
        [SPEC], new_database, extra_env={"AIMESH_USER_KEY_PUBLISH_LEAD_S": "1"}
    )
    try:
        async with running.channel() as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            admin = await admin_token(stub)
            _, old_token = await register_and_login(stub)
            rotated = await stub.RotateSigningKey(
                pb.RotateSigningKeyRequest(), metadata=bearer(admin)
            )
            await asyncio.sleep(1.2)
            _, new_token = await register_and_login(stub)
            assert jwt.get_unverified_header(new_token)["kid"] == rotated.kid
            for token in (old_token, new_token):
                await stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=bearer(token))
    finally:
        await running.server.stop(0.5)


async def test_rotate_needs_admin(users: Stub) -> None:
    _, token = await register_and_login(users)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.RotateSigningKey(pb.RotateSigningKeyRequest(), metadata=bearer(token))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_protected_method_without_credentials_is_unauthenticated(users: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.GetUser(pb.GetUserRequest(name="users/me"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_request_id_is_echoed_in_error_metadata(users: Stub) -> None:
    call = users.GetUser(
        pb.GetUserRequest(name="users/me"), metadata=(("x-request-id", "req-123"),)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-request-id"] == "req-123"


async def test_a_wrong_refresh_secret_burns_nothing(users: Stub) -> None:
    email = f"w{uuid.uuid4().hex[:8]}@example.com"
    await users.Register(pb.RegisterRequest(email=email, password="a-long-password-1"))
    login = await users.Login(pb.LoginRequest(email=email, password="a-long-password-1"))
    prefix, token_id, _ = login.refresh_token.split("_", 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.RefreshToken(pb.RefreshTokenRequest(refresh_token=f"{prefix}_{token_id}_guess"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The owner's token still works once, and is not taken for a reuse.
    await users.RefreshToken(pb.RefreshTokenRequest(refresh_token=login.refresh_token))


async def test_an_api_key_cannot_make_keys_or_delete_its_owner(users: Stub) -> None:
    _, token = await register_and_login(users)
    created = await users.CreateApiKey(
        pb.CreateApiKeyRequest(parent="users/me", api_key=pb.ApiKey(display_name="all")),
        metadata=bearer(token),
    )
    as_key = (("x-api-key", created.key),)
    exchanged = await users.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=created.key))
    for metadata in (as_key, bearer(exchanged.access_token)):
        for call in (
            users.CreateApiKey(
                pb.CreateApiKeyRequest(parent="users/me", api_key=pb.ApiKey(display_name="more")),
                metadata=metadata,
            ),
            users.DeleteUser(pb.DeleteUserRequest(name="users/me"), metadata=metadata),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The key still reads.
    await users.GetUser(pb.GetUserRequest(name="users/me"), metadata=as_key)


async def test_credential_guessing_is_rate_limited_per_client(new_database: Any) -> None:
    from aimesh_user.server import SPEC

    running = await start_server(
        [SPEC], new_database, rate_limit_anonymous_rps=0.5, rate_limit_anonymous_burst=3
    )
    try:
        async with running.channel() as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            codes = []
            for attempt in range(4):
                call = (
                    stub.Login(pb.LoginRequest(email="a@example.com", password="guess-guess"))
                    if attempt % 2 == 0
                    else stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=bearer("x.y.z"))
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                codes.append(caught.value.code())
    finally:
        await running.server.stop(0.5)
    assert codes[:2] == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[2:]


async def test_register_is_rate_limited_per_client_and_per_email(new_database: Any) -> None:
    from aimesh_user.server import SPEC

    running = await start_server(
        [SPEC],
        new_database,
        extra_env={
            "AIMESH_USER_REGISTER_PER_CLIENT_PER_HOUR": "3",
            "AIMESH_USER_REGISTER_PER_EMAIL_PER_HOUR": "2",
        },
        trust_forwarded_for=True,
    )

    async def register(stub: Stub, email: str, client: str) -> grpc.StatusCode:
        request = pb.RegisterRequest(email=email, password="a-long-password-1")
        try:
            await stub.Register(request, metadata=(("x-forwarded-for", client),))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert details_of(error)["ErrorInfo"].reason == "REGISTER_RATE_LIMITED"  # type: ignore[attr-defined]
                assert "RetryInfo" in details_of(error)
            return error.code()
        return grpc.StatusCode.OK

    ok, taken, limited = (
        grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED
    )  # fmt: skip
    try:
        async with running.channel() as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            # One email probed from many places: its third try is refused.
            probed = [
                await register(stub, "Probed@example.com", f"198.51.100.{i}") for i in (1, 2, 3)
            ]
            assert probed == [ok, taken, limited]
            # One place walking a list: its fourth try is refused, taken or not.
            walked = [await register(stub, f"w{i}@example.com", "203.0.113.9") for i in range(3)]
            assert walked == [ok, ok, ok]
            assert await register(stub, "w0@example.com", "203.0.113.9") == limited
            assert await register(stub, "fresh@example.com", "203.0.113.9") == limited
            assert await register(stub, "fresh@example.com", "203.0.113.10") == ok
    finally:
        await running.server.stop(0.5)


async def test_each_platform_service_gets_an_account_of_its_own(users: Stub) -> None:
    """Bootstrapped from configuration: only its key's tokens name the service."""
    admin = bearer(await admin_token(users))
    reply = await users.GetUser(pb.GetUserRequest(name="users/service-search"), metadata=admin)
    # The per-service role is no Role the contract can name, so no UpdateUser grants it.
    assert list(reply.user.roles) == [pb.ROLE_SERVICE]
    assert "mesh.service.search" in reply.user.scopes
    assert "mesh.service.chat" not in reply.user.scopes
    token = await platform_service_token(users, "search")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "service-search"
    scopes = set(claims["scope"].split())
    assert {"mesh.service", "mesh.service.search", "notify.write"} <= scopes
    assert not any(s.startswith("mesh.service.") and s != "mesh.service.search" for s in scopes)
    # A member's own key never carries a service's scope, whatever it asks for.
    member, member_token = await register_and_login(users)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await users.CreateApiKey(
            pb.CreateApiKeyRequest(
                parent=member.name, api_key=pb.ApiKey(scopes=["mesh.service.search"])
            ),
            metadata=bearer(member_token),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
