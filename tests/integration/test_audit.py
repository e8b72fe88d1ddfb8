"""The hash-chained audit log: appends, tampering found and named, the CLI, and
chat's audit row per answer."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aimesh.chat.v1 import chat_service_pb2 as chat_pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from aimesh_chat.prompting import estimate_tokens
from aimesh_cli.main import main as aimesh
from aimesh_runtime import audit, db
from tests.conftest import Running, bearer, register_and_login
from tests.fakes.anthropic_server import FakeAnthropic, Scenario
from tests.fakes.chat_harness import collect, new_conversation, start_chat
from tests.fakes.search import FakeSearch, SearchScenario

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "aimesh_chat" / "migrations"


@pytest.fixture
async def url(new_database: Any) -> str:
    url: str = await new_database("audit")
    pool = await db.create_pool(url)
    await db.migrate(pool, MIGRATIONS)
    await pool.close()
    return url


@pytest.fixture
async def conn(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url)
    yield connection
    await connection.close()


async def append(conn: asyncpg.Connection, count: int) -> None:
    for n in range(count):
        async with conn.transaction():
            await audit.record(conn, kind="t.decision", subject=f"s/{n}", decision={"n": n})


async def test_an_intact_chain_verifies(conn: asyncpg.Connection) -> None:
    await append(conn, 5)
    assert await audit.verify(conn) == []
    assert (await audit.head(conn))[0] == 5


async def test_concurrent_appends_make_one_line(url: str, conn: asyncpg.Connection) -> None:
    pool = await asyncpg.create_pool(url, min_size=4, max_size=4)

    async def one(n: int) -> None:
        async with pool.acquire() as c, c.transaction():
            await audit.record(c, kind="t.concurrent", subject=f"s/{n}", decision={"n": n})

    try:
        await asyncio.gather(*(one(n) for n in range(40)))
    finally:
        await pool.close()
    assert await audit.verify(conn) == []
    assert await conn.fetchval("SELECT array_agg(seq ORDER BY seq) FROM audit_log") == list(
        range(1, 41)
    )


async def test_a_rolled_back_append_leaves_no_trace(conn: asyncpg.Connection) -> None:
    await append(conn, 2)
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await audit.record(conn, kind="t.gone", subject="s", decision={})
            raise RuntimeError("the decision was not made after all")
    await append(conn, 1)
    assert await audit.verify(conn) == []


async def test_an_edited_and_a_deleted_row_are_named(conn: asyncpg.Connection) -> None:
    await append(conn, 6)
    await conn.execute("""UPDATE audit_log SET decision = '{"n":99}' WHERE seq = 2""")
    await conn.execute("DELETE FROM audit_log WHERE seq = 4")
    findings = await audit.verify(conn)
    assert [(f.seq, f.problem) for f in findings] == [(2, "edited"), (4, "deleted")]


async def test_an_edit_with_a_recomputed_hash_is_named(conn: asyncpg.Connection) -> None:
    await append(conn, 4)
    row = await conn.fetchrow("SELECT * FROM audit_log WHERE seq = 2")
    forged = audit.link(
        bytes(row["prev_hash"]), 2, row["kind"], row["subject"], '{"n":7}', row["create_time"]
    )
    await conn.execute(
        """UPDATE audit_log SET decision = '{"n":7}', hash = $1 WHERE seq = 2""", forged
    )
    assert [(f.seq, f.problem) for f in await audit.verify(conn)] == [(2, "edited")]


async def test_deleting_the_newest_rows_is_named(conn: asyncpg.Connection) -> None:
    await append(conn, 5)
    await conn.execute("DELETE FROM audit_log WHERE seq >= 4")
    assert [(f.seq, f.problem) for f in await audit.verify(conn)] == [
        (4, "deleted"),
        (5, "deleted"),
    ]


def test_the_cli_exits_non_zero_naming_the_row(
    new_database: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async def prepare() -> str:
        url: str = await new_database("auditcli")
        pool = await db.create_pool(url)
        await db.migrate(pool, MIGRATIONS)
        async with pool.acquire() as c:
            await append(c, 3)
        await pool.close()
        return url

    url = asyncio.run(prepare())
    args = ["audit", "verify", "--service", "chat", "--database-url", url]
    assert aimesh(args) == 0
    assert "3 rows, chain intact" in capsys.readouterr().out

    async def tamper() -> None:
        c = await asyncpg.connect(url)
        await c.execute("UPDATE audit_log SET subject = 'someone-else' WHERE seq = 2")
        await c.close()

    asyncio.run(tamper())
    assert aimesh(args) == 1
    assert "chat: audit row 2 edited" in capsys.readouterr().out


async def test_each_chat_answer_appends_an_audit_row_and_a_spent_budget_emits(
    new_database: Any, user_server: Running, users: Any
) -> None:
    fake = await FakeAnthropic().start()
    search = await FakeSearch().start()
    search.reset(SearchScenario(documents=[("alpha", "Alpha: Envoy routes gRPC calls.")]))
    fake.reset(Scenario(chunks=["Envoy routes [1]."]))
    message = "What routes calls?"
    # Room for the question, not for the answer: this answer spends the day's budget.
    budget = estimate_tokens(message) + 1
    chat = await start_chat(
        new_database, user_server, fake, search, AIMESH_CHAT_DAILY_TOKEN_BUDGET=str(budget)
    )
    try:
        user, token = await register_and_login(users)
        async with chat.channel() as channel:
            stub = chat_service_pb2_grpc.ChatServiceStub(channel)
            name = await new_conversation(stub, bearer(token))
            request = chat_pb.StreamChatRequest(
                conversation=name, message=message, collection="collections/docs"
            )
            events = await collect(stub.StreamChat(request, metadata=bearer(token)))
    finally:
        await chat.server.stop(0.5)
        await fake.stop()
        await search.stop()
    answer = next(e.start.assistant_message for e in events if e.WhichOneof("event") == "start")
    usage = next(e.usage for e in events if e.WhichOneof("event") == "usage")
    conn = await asyncpg.connect(chat.environ["AIMESH_CHAT_DATABASE_URL"])
    try:
        row = await conn.fetchrow("SELECT * FROM audit_log")
        assert await audit.verify(conn) == []
        spent = await conn.fetch("SELECT * FROM outbox WHERE topic = 'chat.budget_exhausted'")
    finally:
        await conn.close()
    decision = json.loads(row["decision"])
    assert row["kind"] == "chat.answer" and row["subject"] == answer
    assert decision["model"] == "claude-sonnet-4-6"
    assert decision["sources"] == ["collections/docs/documents/alpha"]
    assert decision["input_tokens"] == usage.input_tokens
    assert decision["output_tokens"] == usage.output_tokens
    assert decision["degraded"] is False and decision["owner"] == user.name
    assert [json.loads(r["payload"]) for r in spent] == [
        {
            "user": user.name,
            "day": spent[0]["create_time"].date().isoformat(),
            "budget_tokens": budget,
            "used_tokens": usage.input_tokens + usage.output_tokens,
        }
    ]


async def test_answers_finishing_together_cross_the_budget_exactly_once(new_database: Any) -> None:
    """Twenty answers of one owner stored at once: the day's counter adds them
    all up, and only the answer whose tokens cross the budget emits the event."""
    from aimesh_chat.server import SPEC
    from aimesh_chat.store import AnswerOutcome, ChatStore

    pool = await db.create_pool(await new_database("budget"), max_size=20)
    try:
        await db.migrate(pool, SPEC.migrations)
        store = ChatStore(pool)
        day = dt.date(2026, 12, 1)
        await store.create_conversation("c1", "owner", "")
        outcome = AnswerOutcome("answer", [], 60, 40, "m", "END_TURN", False, [])
        ids = [f"a{n}" for n in range(20)]
        for answer in ids:
            await store.start_turn("c1", f"u-{answer}", "question", answer, "m")
        await asyncio.gather(
            *(store.finish_answer(answer, "owner", day, outcome, 1050) for answer in ids)
        )
        context = await store.turn_context("c1", "owner", day, 0)
        other_day = await store.turn_context("c1", "owner", day + dt.timedelta(days=1), 0)
        events = await pool.fetch(
            "SELECT payload FROM outbox WHERE topic = 'chat.budget_exhausted'"
        )
    finally:
        await pool.close()
    assert context.used_tokens == 2000 and other_day.used_tokens == 0
    assert [json.loads(e["payload"])["used_tokens"] for e in events] == [1100]


# Erasure: a deleted user's id leaves the audit log; the chain still verifies.

ERASED = "0123456789abcdef0123456789abcdef"
KEPT = "fedcba9876543210fedcba9876543210"


async def test_pseudonymising_a_user_rechains_and_edits_are_still_caught(
    conn: asyncpg.Connection,
) -> None:
    await append(conn, 2)
    for user in (ERASED, KEPT, ERASED):
        async with conn.transaction():
            await audit.record(
                conn, kind="chat.answer", subject=f"users/{user}/x", decision={"owner": user}
            )
    await append(conn, 2)
    replaced = await audit.head(conn)
    kept_before = await conn.fetch("SELECT * FROM audit_log WHERE seq < 3 ORDER BY seq")

    async with conn.transaction():
        assert await audit.pseudonymise(conn, ERASED) == 2

    rows = await conn.fetch("SELECT * FROM audit_log ORDER BY seq")
    assert not any(ERASED in row["subject"] + row["decision"] for row in rows)
    aliases = {json.loads(rows[n]["decision"])["owner"] for n in (2, 4)}
    assert len(aliases) == 1 and aliases.pop().startswith("erased-")  # one user, one pseudonym
    assert json.loads(rows[3]["decision"])["owner"] == KEPT
    assert [dict(r) for r in rows[:2]] == [dict(r) for r in kept_before]  # before: untouched
    last = rows[-1]
    assert last["kind"] == "audit.pseudonymised"
    assert json.loads(last["decision"])["replaced_head"] == {
        "seq": replaced[0],
        "hash": replaced[1],
    }
    assert await audit.verify(conn) == []
    assert await audit.pseudonymise(conn, ERASED) == 0  # nothing left to replace

    await conn.execute('UPDATE audit_log SET decision = \'{"owner":"x"}\' WHERE seq = 5')
    assert [str(f) for f in await audit.verify(conn)] == [
        "audit row 5 edited: its content does not match its hash"
    ]
