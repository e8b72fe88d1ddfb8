-- Webhook secrets are sealed at rest from here on (aimesh_notify/sealing.py):
-- subscriptions.secret and previous_secret keep their columns, which now hold
-- "aesgcm1:" text; the service seals plaintext left from before at start.

-- A known value sealed under AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY by the first
-- process to start: one started with another key refuses to run before it
-- seals or signs anything, even while no subscription exists.
CREATE TABLE secret_key_check (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    sealed text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
