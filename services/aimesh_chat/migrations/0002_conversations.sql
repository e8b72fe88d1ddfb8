-- Conversations, their messages, and the token usage that budgets are checked against.
CREATE TABLE conversations (
    id text PRIMARY KEY,
    owner_id text NOT NULL,
    display_name text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_page ON conversations (owner_id, update_time DESC, id DESC);

CREATE TABLE messages (
    id text PRIMARY KEY,
    -- Insertion order: create_time ties within a turn, this does not.
    seq bigserial NOT NULL UNIQUE,
    conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('user', 'assistant')),
    text text NOT NULL DEFAULT '',
    citations text[] NOT NULL DEFAULT '{}',
    input_tokens bigint,
    output_tokens bigint,
    model text NOT NULL DEFAULT '',
    -- NULL while the answer streams; a StopReason name once it ended.
    stop_reason text,
    partial boolean NOT NULL DEFAULT false,
    degraded_reasons text[] NOT NULL DEFAULT '{}',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_page ON messages (conversation_id, seq);

-- One row per answer; the budget is the sum over the principal's UTC day.
-- No foreign key to messages: usage outlives a deleted conversation, so a
-- purge cannot reset anyone's budget.
CREATE TABLE token_usage (
    id bigserial PRIMARY KEY,
    owner_id text NOT NULL,
    message_id text NOT NULL,
    day date NOT NULL,
    model text NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX token_usage_owner_day ON token_usage (owner_id, day);
