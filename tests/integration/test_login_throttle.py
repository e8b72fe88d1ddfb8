"""Failed logins are throttled per account and per client address (issue 17, item 8).

The server trusts X-Forwarded-For here, so each test speaks from addresses of
its own. Locks are long (20 s and more) so no assertion races their expiry."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from argon2 import PasswordHasher
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from tests.conftest import Running, start_server

FREE = 3
ADDRESS_FREE = 8
BASE_DELAY_S = 20.0
MAX_DELAY_S = 40.0
PASSWORD = "the-right-password-1"


@pytest.fixture(scope="module")
async def throttled(new_database: Any) -> AsyncIterator[Running]:
    from aimesh_user.server import SPEC

    running = await start_server(
        [SPEC],
        new_database,
        extra_env={
            "AIMESH_USER_LOGIN_FREE_FAILURES": str(FREE),
            "AIMESH_USER_LOGIN_ADDRESS_FREE_FAILURES": str(ADDRESS_FREE),
            "AIMESH_USER_LOGIN_BASE_DELAY_S": str(BASE_DELAY_S),
            "AIMESH_USER_LOGIN_MAX_DELAY_S": str(MAX_DELAY_S),
        },
        trust_forwarded_for=True,
    )
    yield running
    await running.server.stop(0.5)


@pytest.fixture(scope="module")
async def stub(throttled: Running) -> AsyncIterator[user_service_pb2_grpc.UserServiceStub]:
    async with throttled.channel() as channel:
        yield user_service_pb2_grpc.UserServiceStub(channel)


def new_email() -> str:
    return f"t{uuid.uuid4().hex[:10]}@example.com"


def new_address() -> str:
    return f"198.51.100.{uuid.uuid4().int % 250 + 1}-{uuid.uuid4().hex[:6]}"


async def register(stub: user_service_pb2_grpc.UserServiceStub) -> str:
    email = new_email()
    await stub.Register(pb.RegisterRequest(email=email, password=PASSWORD))
    return email


async def login(
    stub: user_service_pb2_grpc.UserServiceStub, email: str, password: str, address: str
) -> tuple[grpc.StatusCode, str, float | None]:
    """(code, details, RetryInfo delay in seconds or None)."""
    try:
        await stub.Login(
            pb.LoginRequest(email=email, password=password),
            metadata=(("x-forwarded-for", address),),
        )
    except grpc.aio.AioRpcError as error:
        status = rpc_status.from_call(error)
        retry = None
        for detail in status.details if status is not None else []:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                retry = info.retry_delay.ToTimedelta().total_seconds()
        return error.code(), error.details() or "", retry
    return grpc.StatusCode.OK, "", None


async def fail(
    stub: user_service_pb2_grpc.UserServiceStub, email: str, address: str, n: int
) -> list[grpc.StatusCode]:
    return [(await login(stub, email, "wrong-password", address))[0] for _ in range(n)]


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_failed_logins_lock_the_account_with_retry_info(stub: Any) -> None:
    email, address = await register(stub), new_address()
    assert await fail(stub, email, address, FREE + 1) == [UNAUTHENTICATED] * (FREE + 1)
    code, details, retry = await login(stub, email, PASSWORD, address)  # right, but locked
    assert code == EXHAUSTED, details
    assert retry is not None and 0 < retry <= BASE_DELAY_S
    # Another address is held back too: the lock is on the account.
    assert (await login(stub, email, PASSWORD, new_address()))[0] == EXHAUSTED


async def test_an_unknown_email_gets_the_same_answers(stub: Any) -> None:
    known, unknown = await register(stub), new_email()
    answers = []
    for email in (known, unknown):
        address = new_address()
        codes = await fail(stub, email, address, FREE + 1)
        code, details, retry = await login(stub, email, PASSWORD, address)
        answers.append((codes, code, details, retry is not None))
    assert answers[0] == answers[1]


async def test_a_password_is_checked_for_unknown_emails_and_never_while_locked(
    stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same work for known and unknown emails (so the same time), none when locked."""
    checked: list[str] = []
    verify = PasswordHasher.verify

    def counting(self: PasswordHasher, stored: Any, password: Any) -> bool:
        checked.append(str(password))
        return verify(self, stored, password)

    monkeypatch.setattr(PasswordHasher, "verify", counting)
    for email in (await register(stub), new_email()):
        address = new_address()
        checked.clear()
        await fail(stub, email, address, FREE + 1)
        assert len(checked) == FREE + 1, email
        checked.clear()
        assert (await login(stub, email, PASSWORD, address))[0] == EXHAUSTED
        assert checked == [], email


async def test_a_successful_login_resets_the_failures(stub: Any) -> None:
    email, address = await register(stub), new_address()
    assert await fail(stub, email, address, FREE) == [UNAUTHENTICATED] * FREE
    assert (await login(stub, email, PASSWORD, address))[0] == grpc.StatusCode.OK
    # Without the reset this failure would be one too many and lock the account.
    other = new_address()
    assert await fail(stub, email, other, FREE) == [UNAUTHENTICATED] * FREE
    assert (await login(stub, email, PASSWORD, other))[0] == grpc.StatusCode.OK


async def test_a_distributed_attacker_cannot_lock_the_owner_out(stub: Any) -> None:
    email, home = await register(stub), new_address()
    assert (await login(stub, email, PASSWORD, home))[0] == grpc.StatusCode.OK
    codes = []
    for _ in range(3 * FREE):  # a new address for every guess
        codes += await fail(stub, email, new_address(), 1)
    assert codes[: FREE + 1] == [UNAUTHENTICATED] * (FREE + 1)
    assert set(codes[FREE + 1 :]) == {EXHAUSTED}  # the account is locked for them
    code, _, retry = await login(stub, email, PASSWORD, new_address())
    assert code == EXHAUSTED and retry is not None and retry <= MAX_DELAY_S  # short, at worst
    # The owner, from an address it logged in from before, is not held back.
    assert (await login(stub, email, PASSWORD, home))[0] == grpc.StatusCode.OK


async def test_one_address_trying_many_accounts_is_locked(stub: Any) -> None:
    address, owner = new_address(), await register(stub)
    codes = [(await login(stub, new_email(), "guess", address))[0] for _ in range(ADDRESS_FREE + 1)]
    assert codes == [UNAUTHENTICATED] * (ADDRESS_FREE + 1)
    code, _, retry = await login(stub, owner, PASSWORD, address)
    assert code == EXHAUSTED and retry is not None and 0 < retry <= MAX_DELAY_S
    assert (await login(stub, owner, PASSWORD, new_address()))[0] == grpc.StatusCode.OK
