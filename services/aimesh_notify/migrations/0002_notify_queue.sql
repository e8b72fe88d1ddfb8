-- Subscriptions, the event log that streams read, and the durable delivery queue.

-- Does any filter ("user.deleted", or a prefix "search.*") match the topic?
CREATE FUNCTION topic_matches(filters text[], topic text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT EXISTS (
        SELECT 1 FROM unnest(filters) AS f
        WHERE f = topic
           OR (right(f, 2) = '.*' AND left(topic, length(f) - 1) = left(f, length(f) - 1))
    )
$$;

CREATE TABLE subscriptions (
    id text PRIMARY KEY,
    owner_id text NOT NULL,
    display_name text NOT NULL DEFAULT '',
    topics text[] NOT NULL,
    kind text NOT NULL CHECK (kind IN ('webhook', 'stream')),
    -- Webhooks only.
    url text,
    timeout_ms integer,
    -- Kept readable: signing needs the secret itself, not a hash of it.
    secret text,
    secret_create_time timestamptz,
    previous_secret text,
    previous_secret_expire_time timestamptz,
    -- A stream sees the events stored after this position: those published once it existed.
    start_pos bigint NOT NULL DEFAULT 0,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    CHECK (kind = 'stream' OR (url IS NOT NULL AND secret IS NOT NULL))
);
CREATE INDEX subscriptions_owner ON subscriptions (owner_id, create_time, id);
CREATE INDEX subscriptions_page ON subscriptions (create_time, id);

-- Stream order. Publishing only inserts (so concurrent publishes commit
-- together); one sequencer at a time then numbers the committed, unnumbered
-- events in a single transaction. Numbers therefore become visible strictly in
-- order, and a reader that has seen sequence n never later finds a smaller one.
CREATE TABLE event_sequence (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_seq bigint NOT NULL DEFAULT 0,
    -- Events up to here were removed by retention; older cursors cannot resume.
    pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO event_sequence DEFAULT VALUES;

CREATE TABLE events (
    -- Insertion order, with gaps and out of commit order; deliveries refer to it.
    pos bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    -- Stream order; NULL until the sequencer numbers the event.
    seq bigint UNIQUE,
    topic text NOT NULL,
    payload bytea NOT NULL,
    content_type text NOT NULL,
    -- The unique index is what makes a publish happen once, however concurrent.
    idempotency_key text NOT NULL UNIQUE,
    publish_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_unsequenced ON events (pos) WHERE seq IS NULL;
CREATE INDEX events_publish_time ON events (publish_time);

-- The queue: one row per (webhook subscription, event).
CREATE TABLE deliveries (
    id bigserial PRIMARY KEY,
    subscription_id text NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    event_pos bigint NOT NULL REFERENCES events (pos) ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'in_flight', 'succeeded', 'dead_letter')),
    -- Attempts started in the current round; a redrive starts a new round at 0.
    attempts integer NOT NULL DEFAULT 0,
    -- PENDING: when the next attempt is due. IN_FLIGHT: when the lease expires
    -- and another worker may take the delivery over.
    run_after timestamptz NOT NULL DEFAULT now(),
    -- Who holds the lease; a worker whose lease was taken over cannot finish it.
    lease uuid,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, event_pos)
);
CREATE INDEX deliveries_due ON deliveries (run_after) WHERE status IN ('pending', 'in_flight');
CREATE INDEX deliveries_page ON deliveries (subscription_id, id DESC);
CREATE INDEX deliveries_event ON deliveries (event_pos);

CREATE TABLE delivery_attempts (
    id bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    http_status integer NOT NULL DEFAULT 0,
    error text NOT NULL DEFAULT '',
    start_time timestamptz NOT NULL,
    end_time timestamptz NOT NULL
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, id);
