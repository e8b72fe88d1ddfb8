-- Accounts, credentials, signing keys and the audit log of the user service.
CREATE TABLE users (
    id text PRIMARY KEY,
    email text NOT NULL,
    email_normalized text NOT NULL UNIQUE,
    display_name text NOT NULL DEFAULT '',
    password_hash text NOT NULL,
    roles text[] NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_page ON users (create_time, id);

CREATE TABLE api_keys (
    id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    display_name text NOT NULL,
    prefix text NOT NULL UNIQUE,
    -- SHA-256 of the secret: keys are 256-bit random, so a slow hash adds nothing.
    secret_hash bytea NOT NULL,
    scopes text[] NOT NULL,
    expire_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    revoke_time timestamptz,
    last_use_time timestamptz
);
CREATE INDEX api_keys_page ON api_keys (user_id, create_time DESC, id DESC);

CREATE TABLE refresh_tokens (
    id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    secret_hash bytea NOT NULL,
    expire_time timestamptz NOT NULL,
    used_time timestamptz,
    revoke_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE signing_keys (
    kid text PRIMARY KEY,
    -- Ed25519 private key, AES-256-GCM encrypted under the key-encryption key.
    private_key_sealed bytea NOT NULL,
    public_key bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    -- NULL while the key signs; afterwards it verifies until this time.
    retire_time timestamptz
);
-- At most one signing key, even when replicas start or rotate together.
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys ((true)) WHERE retire_time IS NULL;

CREATE TABLE audit_events (
    id bigserial PRIMARY KEY,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}',
    create_time timestamptz NOT NULL DEFAULT now()
);
