"""A tamper-evident audit trail of decisions, in the deciding service's own database.

Each row's hash is SHA-256 over the previous row's hash and the row's
canonical JSON, so editing a row breaks its own hash (or, if the editor
recomputed it, the next row's link), and deleting one leaves a hole in `seq`.
The head table moves with every append, so deleting the newest rows shows
too. Appends take a transaction-scoped advisory lock: rows of concurrent
transactions queue up, and the chain stays a line. The lock is held only
from the append to the caller's commit, so append last in a transaction.

This catches edits made without rewriting the whole chain; an attacker who
rewrites every hash from the edit on is caught only by comparing the head
with a copy kept elsewhere (`aimesh audit verify` prints it).

Erasure: once a user is deleted, `pseudonymise` replaces their id in every
row with a keyed pseudonym ("erased-" + HMAC-SHA256 under a random key that is
then discarded: the user's rows still link to each other, nobody can tie them
back to the id), re-chains the hashes from the first row it changed, and
appends an "audit.pseudonymised" row naming the head it replaced, so a copy of
an older head is accounted for rather than silently broken. The chain then
verifies, and a later edit is caught as before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

AUDIT_LOCK_ID = 7_361_224_050  # advisory lock key serialising appends
GENESIS = bytes(32)
VERIFY_BATCH = 5_000
PSEUDONYM_PREFIX = "erased-"


@dataclass(frozen=True)
class Finding:
    """A row that is not as it was appended."""

    seq: int
    problem: str  # "edited" or "deleted"
    detail: str

    def __str__(self) -> str:
        return f"audit row {self.seq} {self.problem}: {self.detail}"


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: one text per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def link(
    prev_hash: bytes, seq: int, kind: str, subject: str, decision: str, time: dt.datetime
) -> bytes:
    body = canonical([seq, kind, subject, decision, time.astimezone(dt.UTC).isoformat()])
    return hashlib.sha256(prev_hash + body.encode()).digest()


async def record(
    conn: asyncpg.Connection, *, kind: str, subject: str, decision: Mapping[str, Any]
) -> None:
    """Append a decision; it commits or rolls back with the caller's transaction."""
    text = canonical(dict(decision))
    # Microseconds are what PostgreSQL keeps: hash exactly what is stored.
    now = dt.datetime.now(dt.UTC)
    async with conn.transaction():  # a savepoint inside the caller's transaction
        await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK_ID)
        head = await conn.fetchrow("SELECT seq, hash FROM audit_head")
        seq, prev = (1, GENESIS) if head is None else (head["seq"] + 1, bytes(head["hash"]))
        digest = link(prev, seq, kind, subject, text, now)
        await conn.execute(
            """INSERT INTO audit_log (seq, kind, subject, decision, create_time, prev_hash, hash)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            seq, kind, subject, text, now, prev, digest,
        )  # fmt: skip
        await conn.execute(
            """INSERT INTO audit_head (singleton, seq, hash) VALUES (true, $1, $2)
               ON CONFLICT (singleton) DO UPDATE SET seq = $1, hash = $2""",
            seq,
            digest,
        )


def pseudonym(user_id: str, key: bytes) -> str:
    return PSEUDONYM_PREFIX + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]


def new_pseudonym(user_id: str) -> str:
    """A pseudonym under a fresh random key that is discarded at once."""
    return pseudonym(user_id, os.urandom(32))


def _replaced(text: str, user_id: str, alias: str) -> str:
    # The id as a whole word only: "users/ab" must not touch "users/abc".
    return re.sub(rf"(?<![\w-]){re.escape(user_id)}(?![\w-])", alias, text)


async def pseudonymise(conn: asyncpg.Connection, user_id: str, alias: str | None = None) -> int:
    """Replace `user_id` in every row's subject and decision with a keyed pseudonym
    (`alias`, else a new one) and re-chain; returns the rows changed. Commits or
    rolls back with the caller's transaction (run it in the one that erases the
    user's data)."""
    if not user_id:
        raise ValueError("no user id to pseudonymise")
    alias = alias or new_pseudonym(user_id)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK_ID)
        candidates = await conn.fetch(
            """SELECT seq, subject, decision FROM audit_log
                WHERE strpos(subject, $1) > 0 OR strpos(decision, $1) > 0 ORDER BY seq""",
            user_id,
        )
        changed = [
            (row["seq"], _replaced(row["subject"], user_id, alias),
             _replaced(row["decision"], user_id, alias))
            for row in candidates
        ]  # fmt: skip
        changed = [c for c, row in zip(changed, candidates, strict=True) if c[1:] != tuple(row)[1:]]
        if not changed:
            return 0
        await conn.executemany(
            "UPDATE audit_log SET subject = $2, decision = $3 WHERE seq = $1", changed
        )
        first = int(changed[0][0])
        count = len(changed)
        previous_head = await conn.fetchrow("SELECT seq, hash FROM audit_head")
        before = await conn.fetchval("SELECT hash FROM audit_log WHERE seq = $1", first - 1)
        prev = GENESIS if before is None else bytes(before)
        last = first - 1
        while rows := await conn.fetch(
            "SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2", last, VERIFY_BATCH
        ):
            updates = []
            for row in rows:
                seq = int(row["seq"])
                digest = link(
                    prev, seq, row["kind"], row["subject"], row["decision"], row["create_time"]
                )
                updates.append((seq, prev, digest))
                prev, last = digest, seq
            await conn.executemany(
                "UPDATE audit_log SET prev_hash = $2, hash = $3 WHERE seq = $1", updates
            )
        await conn.execute("UPDATE audit_head SET seq = $1, hash = $2", last, prev)
        await record(
            conn,
            kind="audit.pseudonymised",
            subject=alias,
            decision={
                "rows": count,
                "rechained_from_seq": int(first),
                "replaced_head": {
                    "seq": int(previous_head["seq"]),
                    "hash": bytes(previous_head["hash"]).hex(),
                },
            },
        )
    return count


async def verify(conn: asyncpg.Connection) -> list[Finding]:
    """Walk the chain from the first row; name every edited or deleted row."""
    findings: list[Finding] = []
    expected_seq, prev = 1, GENESIS
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        last = 0
        while True:
            rows = await conn.fetch(
                "SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2", last, VERIFY_BATCH
            )
            for row in rows:
                seq = int(row["seq"])
                if seq > expected_seq:
                    findings.extend(_deleted(expected_seq, seq - 1, "a hole in the sequence"))
                elif bytes(row["prev_hash"]) != prev:
                    # The row before was rewritten, hash included.
                    findings.append(
                        Finding(seq - 1, "edited", f"its hash does not match row {seq}'s link")
                    )
                computed = link(
                    bytes(row["prev_hash"]),
                    seq,
                    row["kind"],
                    row["subject"],
                    row["decision"],
                    row["create_time"],
                )
                if computed != bytes(row["hash"]):
                    findings.append(Finding(seq, "edited", "its content does not match its hash"))
                prev, expected_seq = bytes(row["hash"]), seq + 1
            if len(rows) < VERIFY_BATCH:
                break
            last = int(rows[-1]["seq"])
        head = await conn.fetchrow("SELECT seq, hash FROM audit_head")
    newest = expected_seq - 1
    if head is not None:
        if head["seq"] > newest:
            findings.extend(_deleted(newest + 1, int(head["seq"]), "newer than the last row"))
        elif head["seq"] == newest and bytes(head["hash"]) != prev:
            findings.append(Finding(newest, "edited", "its hash does not match the chain head"))
    elif newest > 0:
        findings.append(Finding(newest, "edited", "the chain head is missing"))
    return findings


async def head(conn: asyncpg.Connection) -> tuple[int, str]:
    """The newest seq and its hash (hex): keep a copy to detect a rewritten chain."""
    row = await conn.fetchrow("SELECT seq, hash FROM audit_head")
    return (0, GENESIS.hex()) if row is None else (int(row["seq"]), bytes(row["hash"]).hex())


def _deleted(first: int, last: int, why: str) -> list[Finding]:
    return [Finding(seq, "deleted", why) for seq in range(first, last + 1)]
