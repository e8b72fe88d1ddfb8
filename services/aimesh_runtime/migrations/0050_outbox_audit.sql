-- Tables every service shares: the transactional outbox (aimesh_runtime.outbox)
-- and the hash-chained audit log (aimesh_runtime.audit). aimesh_runtime.db.migrate
-- applies it to every service's database; version 0050 leaves 1-49 to the service.

-- Events written in the same transaction as the change they announce; the
-- relay publishes them to notify with the idempotency key "<service>:outbox:<id>".
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    key text NOT NULL,
    payload jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    publish_time timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    last_error text NOT NULL DEFAULT '',
    -- Refused by notify for good (payload too large, key clash): kept, not retried.
    fail_time timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE publish_time IS NULL AND fail_time IS NULL;

-- Append-only decisions. hash = SHA-256(prev_hash || canonical JSON of the row);
-- seq runs 1, 2, 3... without gaps, so a deleted row leaves a hole.
CREATE TABLE audit_log (
    seq bigint PRIMARY KEY,
    kind text NOT NULL,
    subject text NOT NULL,
    -- Canonical JSON text (sorted keys, no spaces), exactly the bytes hashed.
    decision text NOT NULL,
    create_time timestamptz NOT NULL,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL
);
CREATE INDEX audit_log_subject ON audit_log (subject, seq);

-- The chain's last link, moved in the same transaction as each append, so
-- deleting the newest rows shows too.
CREATE TABLE audit_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq bigint NOT NULL,
    hash bytea NOT NULL
);
