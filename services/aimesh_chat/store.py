"""SQL of the chat service, over its own database only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from aimesh_runtime import audit, outbox
from aimesh_runtime.db import KeysetPage


@dataclass(frozen=True)
class ConversationRow:
    id: str
    owner_id: str
    display_name: str
    create_time: dt.datetime
    update_time: dt.datetime


@dataclass(frozen=True)
class MessageRow:
    id: str
    seq: int
    conversation_id: str
    role: str
    text: str
    citations: tuple[str, ...]
    input_tokens: int | None
    output_tokens: int | None
    model: str
    stop_reason: str | None
    partial: bool
    degraded_reasons: tuple[str, ...]
    create_time: dt.datetime
    update_time: dt.datetime


@dataclass(frozen=True)
class AnswerOutcome:
    """How an answer ended, as stored on its message."""

    text: str
    citations: Sequence[str]
    input_tokens: int
    output_tokens: int
    model: str
    stop_reason: str
    partial: bool
    degraded_reasons: Sequence[str]
    sources: Sequence[str] = ()  # documents of the passages the model was given


@dataclass(frozen=True, slots=True)
class Said:
    """A finished message as the model's history needs it."""

    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class TurnContext:
    conversation: ConversationRow | None
    used_tokens: int
    history: list[Said]


def _conversation(row: asyncpg.Record) -> ConversationRow:
    return ConversationRow(
        row["id"], row["owner_id"], row["display_name"], row["create_time"], row["update_time"]
    )


def _message(row: asyncpg.Record) -> MessageRow:
    return MessageRow(
        row["id"],
        row["seq"],
        row["conversation_id"],
        row["role"],
        row["text"],
        tuple(row["citations"]),
        row["input_tokens"],
        row["output_tokens"],
        row["model"],
        row["stop_reason"],
        row["partial"],
        tuple(row["degraded_reasons"]),
        row["create_time"],
        row["update_time"],
    )


class ChatStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create_conversation(
        self, conversation_id: str, owner_id: str, display_name: str
    ) -> ConversationRow:
        row = await self._pool.fetchrow(
            """INSERT INTO conversations (id, owner_id, display_name) VALUES ($1, $2, $3)
               RETURNING *""",
            conversation_id,
            owner_id,
            display_name,
        )
        return _conversation(row)

    async def conversation_owner(self, conversation_id: str) -> str | None:
        """The owner's user id, or None if there is no such conversation."""
        owner: str | None = await self._pool.fetchval(
            "SELECT owner_id FROM conversations WHERE id = $1", conversation_id
        )
        return owner

    async def conversation_of(self, conversation_id: str, owner_id: str) -> ConversationRow | None:
        """The conversation if `owner_id` owns it: someone else's reads as absent."""
        row = await self._pool.fetchrow(
            "SELECT * FROM conversations WHERE id = $1 AND owner_id = $2",
            conversation_id,
            owner_id,
        )
        return None if row is None else _conversation(row)

    async def conversations_of(
        self, owner_id: str, after: tuple[dt.datetime, str] | None, limit: int
    ) -> list[ConversationRow]:
        page = KeysetPage.of(after, limit, column="update_time", descending=True, first=2)
        rows = await self._pool.fetch(
            f"""SELECT * FROM conversations WHERE owner_id = $1 AND {page.where}
                {page.order_limit}""",
            owner_id,
            *page.values,
        )
        return [_conversation(row) for row in rows]

    async def messages_of(
        self, conversation_id: str, after_seq: int, limit: int
    ) -> list[MessageRow]:
        rows = await self._pool.fetch(
            """SELECT * FROM messages WHERE conversation_id = $1 AND seq > $2
               ORDER BY seq LIMIT $3""",
            conversation_id,
            after_seq,
            limit,
        )
        return [_message(row) for row in rows]

    async def message_of(
        self, conversation_id: str, message_id: str, owner_id: str
    ) -> MessageRow | None:
        row = await self._pool.fetchrow(
            """SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id
               WHERE m.id = $1 AND m.conversation_id = $2 AND c.owner_id = $3""",
            message_id,
            conversation_id,
            owner_id,
        )
        return None if row is None else _message(row)

    async def start_turn(
        self, conversation_id: str, user_message_id: str, text: str, answer_id: str, model: str
    ) -> None:
        """Store the user's message and an empty answer, and touch the conversation:
        one statement (so one round trip, atomic without a transaction block), as
        it runs beside the model call and competes with it for the machine."""
        await self._pool.execute(
            """WITH touched AS (
                   UPDATE conversations SET update_time = now() WHERE id = $2)
               INSERT INTO messages (id, conversation_id, role, text, model)
               VALUES ($1, $2, 'user', $3, ''), ($4, $2, 'assistant', '', $5)""",
            user_message_id,
            conversation_id,
            text,
            answer_id,
            model,
        )

    async def finish_answer(
        self,
        answer_id: str,
        owner_id: str,
        day: dt.date,
        outcome: AnswerOutcome,
        daily_budget: int | None = None,
    ) -> None:
        """Record how the answer ended, the tokens it used and its audit entry,
        together; queue chat.budget_exhausted if these tokens spent the budget."""
        async with self._pool.acquire() as connection, connection.transaction():
            conversation_id = await connection.fetchval(
                """UPDATE messages SET text = $2, citations = $3, input_tokens = $4,
                       output_tokens = $5, model = $6, stop_reason = $7, partial = $8,
                       degraded_reasons = $9, update_time = now()
                   WHERE id = $1 RETURNING conversation_id""",
                answer_id,
                outcome.text,
                list(outcome.citations),
                outcome.input_tokens,
                outcome.output_tokens,
                outcome.model,
                outcome.stop_reason,
                outcome.partial,
                list(outcome.degraded_reasons),
            )
            await connection.execute(
                """INSERT INTO token_usage
                       (owner_id, message_id, day, model, input_tokens, output_tokens)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                owner_id,
                answer_id,
                day,
                outcome.model,
                outcome.input_tokens,
                outcome.output_tokens,
            )
            spent = outcome.input_tokens + outcome.output_tokens
            if daily_budget is not None and spent > 0:
                await _note_budget_spent(connection, owner_id, day, spent, daily_budget)
            await audit.record(
                connection,
                kind="chat.answer",
                subject=f"conversations/{conversation_id}/messages/{answer_id}",
                decision={
                    "owner": f"users/{owner_id}",
                    "model": outcome.model,
                    "sources": list(outcome.sources),
                    "citations": list(outcome.citations),
                    "input_tokens": outcome.input_tokens,
                    "output_tokens": outcome.output_tokens,
                    "degraded": bool(outcome.degraded_reasons),
                    "degraded_reasons": list(outcome.degraded_reasons),
                    "stop_reason": outcome.stop_reason,
                    "partial": outcome.partial,
                },
            )

    async def turn_context(
        self, conversation_id: str, owner_id: str, day: dt.date, history: int
    ) -> TurnContext:
        """What a new turn needs before the model is called, in one round trip:
        the conversation (None unless `owner_id` owns it), the owner's tokens used
        on `day`, and the last `history` finished messages, oldest first."""
        rows = await self._pool.fetch(
            """SELECT c.id AS c_id, c.owner_id AS c_owner_id,
                      c.display_name AS c_display_name, c.create_time AS c_create_time,
                      c.update_time AS c_update_time,
                      (SELECT used_tokens FROM token_budget_days
                       WHERE owner_id = $2 AND day = $3) AS used_tokens,
                      m.role, m.text
               FROM (SELECT 1) AS always
               LEFT JOIN conversations c ON c.id = $1 AND c.owner_id = $2
               LEFT JOIN LATERAL (
                   SELECT seq, role, text FROM messages
                   WHERE conversation_id = c.id AND (role = 'user' OR stop_reason IS NOT NULL)
                   ORDER BY seq DESC LIMIT $4) m ON true
               ORDER BY m.seq""",
            conversation_id,
            owner_id,
            day,
            history,
        )
        first = rows[0]
        conversation = None
        if first["c_id"] is not None:
            conversation = ConversationRow(
                first["c_id"],
                first["c_owner_id"],
                first["c_display_name"],
                first["c_create_time"],
                first["c_update_time"],
            )
        said = [Said(row["role"], row["text"]) for row in rows if row["role"] is not None]
        return TurnContext(conversation, int(first["used_tokens"] or 0), said)

    async def purge_owner(self, owner_id: str) -> int:
        async with self._pool.acquire() as connection, connection.transaction():
            deleted = await connection.fetchval(
                """WITH gone AS (DELETE FROM conversations WHERE owner_id = $1 RETURNING 1)
                   SELECT count(*) FROM gone""",
                owner_id,
            )
            await audit.pseudonymise(connection, owner_id)
        return int(deleted)


async def _note_budget_spent(
    connection: asyncpg.Connection, owner_id: str, day: dt.date, spent: int, budget: int
) -> None:
    """Emit chat.budget_exhausted once per owner and day: when usage crosses it.

    Called after this answer's token_usage row is inserted: its trigger holds
    the day's counter row locked until commit, so answers of one owner finishing
    together queue there and each reads a total that includes its own tokens."""
    used = int(
        await connection.fetchval(
            "SELECT used_tokens FROM token_budget_days WHERE owner_id = $1 AND day = $2",
            owner_id,
            day,
        )
    )
    if used - spent < budget <= used:
        await outbox.emit(
            connection,
            topic="chat.budget_exhausted",
            key=f"users/{owner_id}",
            payload={
                "user": f"users/{owner_id}",
                "day": day.isoformat(),
                "budget_tokens": budget,
                "used_tokens": used,
            },
        )
