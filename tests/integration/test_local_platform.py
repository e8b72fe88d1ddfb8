"""The newcomer's path: `aimesh up` on a fresh state folder, then grpcurl and the CLI.

It runs the real command (embedded PostgreSQL included) on shifted ports, so it
can run beside a developer's own `aimesh up`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from aimesh_cli.local import free_port_offset, service_url
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
SERVICES = {
    "user": "aimesh.user.v1.UserService",
    "search": "aimesh.search.v1.SearchService",
    "recommend": "aimesh.recommend.v1.RecommendService",
    "chat": "aimesh.chat.v1.ChatService",
    "notify": "aimesh.notify.v1.NotifyService",
}
BASE_PORTS = {"user": 50051, "search": 50052, "recommend": 50053, "chat": 50054, "notify": 50055}


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "grpcurl"), *args], capture_output=True, text=True, timeout=30)


def aimesh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "aimesh"), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def platform_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}
    env["AIMESH_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    env["AIMESH_PORT_OFFSET"] = str(free_port_offset())
    return env


def start_up(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [str(BIN / "aimesh"), "up", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("Ctrl-C stops everything"):
            return process, "".join(seen)
    process.kill()
    raise AssertionError("aimesh up did not become ready:\n" + "".join(seen))


def stop_up(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=60) == 0
    finally:
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture(scope="module")
def five_processes(platform_env: dict[str, str]) -> Iterator[str]:
    process, banner = start_up(platform_env)
    try:
        yield banner
    finally:
        stop_up(process)


def port(env: dict[str, str], name: str) -> int:
    return BASE_PORTS[name] + int(env["AIMESH_PORT_OFFSET"])


def test_up_prints_endpoints_and_a_grpcurl_example(
    five_processes: str, platform_env: dict[str, str]
) -> None:
    for name in SERVICES:
        assert f"localhost:{port(platform_env, name)}" in five_processes
    assert "all services SERVING in" in five_processes
    assert "export TOKEN=ey" in five_processes and "grpcurl -plaintext" in five_processes


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_grpcurl_lists_each_contract_with_health_and_reflection(
    five_processes: str, platform_env: dict[str, str], name: str
) -> None:
    listed = grpcurl("-plaintext", f"127.0.0.1:{port(platform_env, name)}", "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {
        SERVICES[name],
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = grpcurl(
        "-plaintext", f"127.0.0.1:{port(platform_env, name)}", "describe", SERVICES[name]
    )
    assert described.returncode == 0, described.stderr
    assert f"service {SERVICES[name].rsplit('.', 1)[1]} {{" in described.stdout
    assert "rpc " in described.stdout


def test_status_and_token_then_an_authenticated_grpcurl_call(
    five_processes: str, platform_env: dict[str, str]
) -> None:
    status = aimesh(platform_env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("SERVING") == 5
    token = aimesh(platform_env, "token")
    assert token.returncode == 0, token.stderr
    reply = grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {token.stdout.strip()}",
        "-d",
        '{"name": "users/me"}',
        f"127.0.0.1:{port(platform_env, 'user')}",
        "aimesh.user.v1.UserService/GetUser",
    )
    assert reply.returncode == 0, reply.stderr
    assert "ROLE_ADMIN" in json.loads(reply.stdout)["user"]["roles"]


def test_monolith_serves_all_five_on_one_port(
    five_processes: str, platform_env: dict[str, str]
) -> None:
    # Runs after the multi-process tests in this module share its databases.
    monolith_port = 50050 + int(platform_env["AIMESH_PORT_OFFSET"])
    # No edge: the five-process platform's edge holds this offset's edge ports.
    process, _ = start_up(platform_env, "--monolith", "--no-edge")
    try:
        listed = grpcurl("-plaintext", f"127.0.0.1:{monolith_port}", "list")
        assert set(SERVICES.values()) <= set(listed.stdout.split())
        token = aimesh(platform_env, "token", "--monolith").stdout.strip()
        for method, body in (
            ("aimesh.user.v1.UserService/GetUser", '{"name": "users/me"}'),
            ("aimesh.search.v1.SearchService/ListCollections", "{}"),
            ("aimesh.recommend.v1.RecommendService/ListModelVersions", "{}"),
            ("aimesh.notify.v1.NotifyService/ListSubscriptions", "{}"),
        ):
            reply = grpcurl(
                "-plaintext",
                "-H",
                f"authorization: Bearer {token}",
                "-d",
                body,
                f"127.0.0.1:{monolith_port}",
                method,
            )
            assert reply.returncode == 0, f"{method}: {reply.stderr}"
    finally:
        stop_up(process)


def test_search_cli_imports_with_progress_and_queries_as_a_table(
    five_processes: str, platform_env: dict[str, str], tmp_path: Path
) -> None:
    lines = [
        {"id": "cats", "text": "Cats purr and chase mice around the house."},
        {"id": "orbit", "text": "Rockets carry satellites into orbit."},
        {"id": "bread", "text": "Bread is baked from flour, water and yeast."},
    ]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n{broken\n")
    imported = aimesh(platform_env, "search", "import", str(source), "--collection", "cli")
    assert "3 documents, 1 bad lines" in imported.stdout, imported.stdout + imported.stderr
    assert "line 4:" in imported.stderr and "%" in imported.stderr  # the error and the bar
    queried = aimesh(platform_env, "search", "query", "a kitten", "--collection", "cli")
    assert queried.returncode == 0, queried.stderr
    rows = queried.stdout.splitlines()
    assert rows[0].split() == ["score", "document", "text"]
    assert rows[1].split()[1] == "cats" and "3 results" in queried.stderr
    # Search's outbox announced the import to notify, with its own account's key.
    assert asyncio.run(publishers_of(platform_env, "search.import_finished")) == [
        "users/service-search"
    ]


async def publishers_of(env: dict[str, str], topic: str) -> list[str]:
    """Who published `topic` to notify, read from notify's database once it arrived."""
    state = Path(env["AIMESH_STATE_DIR"])
    lines = (state / "pgdata" / "postmaster.pid").read_text().splitlines()
    admin = f"postgresql://postgres@/postgres?host={lines[4].strip()}&port={lines[3].strip()}"
    password = json.loads((state / "secrets.json").read_text())["role_passwords"]["notify"]
    conn = await asyncpg.connect(service_url(admin, "notify", password))
    try:
        async with asyncio.timeout(30):
            while True:
                rows = await conn.fetch("SELECT publisher FROM events WHERE topic = $1", topic)
                if rows:
                    return [row["publisher"] for row in rows]
                await asyncio.sleep(0.2)
    finally:
        await conn.close()
