"""`aimesh audit verify` and `aimesh saga status ID`.

audit verify reads a service's database directly (the audit log is in the
deciding service's own database): --database-url, else
AIMESH_<SERVICE>_DATABASE_URL, else the local platform's database, as
`aimesh up` provisioned it. It exits 1 naming every edited or deleted row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator

import asyncpg
import grpc

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_cli import local
from aimesh_runtime import audit
from aimesh_runtime.config import SERVICE_PORTS, database_env


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    checking = commands.add_parser("audit", help="check the hash-chained audit logs")
    actions = checking.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="find edited or deleted audit rows")
    verify.add_argument("--service", choices=list(SERVICE_PORTS), help="default: all five")
    verify.add_argument("--database-url", help="the service's database (needs --service)")
    verify.set_defaults(run=_verify)
    saga = commands.add_parser("saga", help="user-deletion sagas")
    saga_actions = saga.add_subparsers(dest="action", required=True)
    status = saga_actions.add_parser("status", help="where a user deletion stands")
    status.add_argument("id", help="the deletion's id or userDeletions/{id}")
    status.add_argument("--target", help="host:port of the user service")
    status.add_argument("--host", default="127.0.0.1")
    status.add_argument("--monolith", action="store_true")
    status.add_argument("--token", help="access token (default: $AIMESH_TOKEN, else the dev admin)")
    status.set_defaults(run=_status)


@contextlib.contextmanager
def _database_urls(services: list[str], explicit: str | None) -> Iterator[dict[str, str]]:
    urls = {s: explicit or os.environ.get(database_env(s), "") for s in services}
    if all(urls.values()):
        yield urls
        return
    folder = local.state_dir()
    stored = local.load_secrets(folder)
    with local.database_server(folder) as admin_url:
        yield {
            s: url or local.service_url(admin_url, s, stored["role_passwords"][s])
            for s, url in urls.items()
        }


async def _verify_one(service: str, url: str) -> int:
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError) as error:
        print(f"{service}: cannot connect to its database: {error}", file=sys.stderr)
        return 2
    try:
        if await conn.fetchval("SELECT to_regclass('audit_log')") is None:
            print(f"{service}: no audit_log table (not migrated yet)", file=sys.stderr)
            return 2
        findings = await audit.verify(conn)
        seq, digest = await audit.head(conn)
    finally:
        await conn.close()
    for finding in findings:
        print(f"{service}: {finding}")
    if findings:
        return 1
    print(f"{service}: {seq} rows, chain intact; head {seq}:{digest}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.database_url and not args.service:
        print("aimesh: --database-url needs --service", file=sys.stderr)
        return 2
    services = [args.service] if args.service else list(SERVICE_PORTS)
    with _database_urls(services, args.database_url) as urls:

        async def run() -> list[int]:
            return [await _verify_one(s, urls[s]) for s in services]

        codes = asyncio.run(run())
    return max(codes)


def _status(args: argparse.Namespace) -> int:
    name = args.id if args.id.startswith("userDeletions/") else f"userDeletions/{args.id}"
    port = local.grpc_port("monolith" if args.monolith else "user")
    target = args.target or f"{args.host}:{port}"

    async def fetch() -> pb.UserDeletion:
        token = await local.caller_token(args.token, args.host, args.monolith)
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await user_service_pb2_grpc.UserServiceStub(channel).GetUserDeletion(
                pb.GetUserDeletionRequest(name=name),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
            deletion: pb.UserDeletion = reply.deletion
            return deletion

    try:
        deletion = asyncio.run(fetch())
    except grpc.aio.AioRpcError as error:
        print(f"aimesh: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    state = pb.UserDeletionState.Name(deletion.state).removeprefix("USER_DELETION_STATE_")
    print(f"{deletion.name}  {deletion.user}  {state}")
    if deletion.abort_reason:
        print(f"aborted: {deletion.abort_reason}")
    rows = [("step", "service", "state", "attempts", "deleted", "last error")]
    for number, step in enumerate(deletion.steps, 1):
        rows.append(
            (
                str(number),
                step.service,
                pb.UserDeletionStepState.Name(step.state).removeprefix("USER_DELETION_STEP_STATE_"),
                str(step.attempts),
                str(step.deleted_count),
                step.last_error,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
