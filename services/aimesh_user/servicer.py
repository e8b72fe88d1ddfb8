"""UserService: proto in, domain call, proto out."""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import duration_pb2

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.context import call_scope
from aimesh_runtime.context import principal as caller
from aimesh_runtime.errors import InvalidArgument
from aimesh_runtime.pages import timestamp
from aimesh_user.accounts import Accounts, scopes_of
from aimesh_user.registration import RegisterThrottle
from aimesh_user.saga import Deletions, deletion_name
from aimesh_user.saga_store import DeletionRow
from aimesh_user.signing import KeyRing
from aimesh_user.store import ApiKeyRow, UserRow

ROLE_NAMES = {pb.ROLE_MEMBER: "member", pb.ROLE_ADMIN: "admin", pb.ROLE_SERVICE: "service"}
ROLE_VALUES = {name: value for value, name in ROLE_NAMES.items()}
DELETION_STATES = {
    "RUNNING": pb.USER_DELETION_STATE_RUNNING,
    "SUCCEEDED": pb.USER_DELETION_STATE_SUCCEEDED,
    "ABORTED": pb.USER_DELETION_STATE_ABORTED,
}
STEP_STATES = {
    "PENDING": pb.USER_DELETION_STEP_STATE_PENDING,
    "SUCCEEDED": pb.USER_DELETION_STEP_STATE_SUCCEEDED,
    "SKIPPED": pb.USER_DELETION_STEP_STATE_SKIPPED,
    "FAILED": pb.USER_DELETION_STEP_STATE_FAILED,
}


def _duration(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def user_proto(row: UserRow) -> pb.User:
    return pb.User(
        name=f"users/{row.id}",
        email=row.email,
        display_name=row.display_name,
        roles=[ROLE_VALUES[role] for role in row.roles if role in ROLE_VALUES],
        scopes=scopes_of(row.roles),
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def api_key_proto(row: ApiKeyRow) -> pb.ApiKey:
    return pb.ApiKey(
        name=f"users/{row.user_id}/apiKeys/{row.id}",
        display_name=row.display_name,
        scopes=list(row.scopes),
        prefix=f"amk_{row.prefix}",
        expire_time=timestamp(row.expire_time),
        create_time=timestamp(row.create_time),
        revoke_time=timestamp(row.revoke_time),
        last_use_time=timestamp(row.last_use_time),
    )


def deletion_proto(row: DeletionRow) -> pb.UserDeletion:
    return pb.UserDeletion(
        name=deletion_name(row.id),
        user=f"users/{row.user_id}",
        state=DELETION_STATES[row.state],
        steps=[
            pb.UserDeletionStep(
                service=step.service,
                state=STEP_STATES[step.state],
                attempts=step.attempts,
                last_error=step.last_error,
                deleted_count=step.deleted_count,
                next_attempt_time=timestamp(step.next_attempt_time),
                end_time=timestamp(step.end_time),
            )
            for step in row.steps
        ],
        abort_reason=row.abort_reason,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        end_time=timestamp(row.end_time),
    )


class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    def __init__(
        self,
        accounts: Accounts,
        keys: KeyRing,
        deletions: Deletions,
        wait_s: float,
        register_throttle: RegisterThrottle,
    ) -> None:
        self._accounts = accounts
        self._register_throttle = register_throttle
        self._keys = keys
        self._deletions = deletions
        self._wait_s = wait_s

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        scope = call_scope()
        self._register_throttle.admit(scope.client_address if scope else "", request.email)
        row = await self._accounts.register(request.email, request.password, request.display_name)
        return pb.RegisterResponse(user=user_proto(row))

    async def Login(
        self, request: pb.LoginRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoginResponse:
        scope = call_scope()
        address = scope.client_address if scope is not None else ""
        row, tokens = await self._accounts.login(request.email, request.password, address)
        return pb.LoginResponse(
            access_token=tokens.access_token,
            access_token_ttl=_duration(tokens.access_ttl_s),
            refresh_token=tokens.refresh_token,
            refresh_token_ttl=_duration(tokens.refresh_ttl_s),
            user=user_proto(row),
        )

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshTokenResponse:
        tokens = await self._accounts.refresh(request.refresh_token)
        return pb.RefreshTokenResponse(
            access_token=tokens.access_token,
            access_token_ttl=_duration(tokens.access_ttl_s),
            refresh_token=tokens.refresh_token,
            refresh_token_ttl=_duration(tokens.refresh_ttl_s),
        )

    async def ExchangeApiKey(
        self, request: pb.ExchangeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExchangeApiKeyResponse:
        token = await self._accounts.exchange_api_key(request.api_key)
        return pb.ExchangeApiKeyResponse(
            access_token=token, access_token_ttl=_duration(self._keys.access_ttl_s)
        )

    async def GetJwks(
        self, request: pb.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(keys=[pb.JsonWebKey(**key) for key in self._keys.jwks()])

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateSigningKeyResponse:
        kid, previous, retire_at, activate_at = await self._keys.rotate(caller().subject)
        return pb.RotateSigningKeyResponse(
            kid=kid,
            previous_kid=previous or "",
            previous_retire_time=timestamp(retire_at),
            activate_time=timestamp(activate_at),
        )

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        row = await self._accounts.get(caller(), request.name)
        return pb.GetUserResponse(user=user_proto(row))

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListUsersResponse:
        rows, next_token = await self._accounts.list_users(request.page_size, request.page_token)
        return pb.ListUsersResponse(
            users=[user_proto(row) for row in rows], next_page_token=next_token
        )

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateUserResponse:
        user = request.user
        row = await self._accounts.update(
            caller(),
            user.name,
            list(request.update_mask.paths),
            user.email,
            user.display_name,
            [ROLE_NAMES[role] for role in user.roles if role in ROLE_NAMES],
        )
        return pb.UpdateUserResponse(user=user_proto(row))

    async def DeleteUser(
        self, request: pb.DeleteUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteUserResponse:
        who = caller()
        started = await self._deletions.start(
            who, self._accounts.authorize_delete(who, request.name)
        )
        remaining = context.time_remaining()
        wait_s = self._wait_s if remaining is None else min(self._wait_s, remaining - 0.5)
        row = await self._deletions.wait(started.id, wait_s)
        return pb.DeleteUserResponse(deletion=deletion_proto(row))

    async def GetUserDeletion(
        self, request: pb.GetUserDeletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserDeletionResponse:
        row = await self._deletions.get(caller(), request.name)
        return pb.GetUserDeletionResponse(deletion=deletion_proto(row))

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        key = request.api_key
        expire = None
        if key.HasField("expire_time"):
            try:
                expire = key.expire_time.ToDatetime(dt.UTC)
            except (ValueError, OverflowError):
                raise InvalidArgument.field("api_key.expire_time", "not a valid time") from None
        row, secret = await self._accounts.create_api_key(
            caller(), request.parent, key.display_name, list(key.scopes), expire
        )
        return pb.CreateApiKeyResponse(api_key=api_key_proto(row), key=secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        rows, next_token = await self._accounts.list_api_keys(
            caller(), request.parent, request.page_size, request.page_token
        )
        return pb.ListApiKeysResponse(
            api_keys=[api_key_proto(row) for row in rows], next_page_token=next_token
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        row = await self._accounts.revoke_api_key(caller(), request.name)
        return pb.RevokeApiKeyResponse(api_key=api_key_proto(row))
