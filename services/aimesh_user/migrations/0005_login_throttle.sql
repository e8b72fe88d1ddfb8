-- Failed logins per account and per client address (aimesh_user.throttle).
-- Keys are SHA-256 digests, so unknown emails typed at the login form are not kept.
CREATE TABLE login_failures (
    key bytea PRIMARY KEY,
    failures integer NOT NULL,
    locked_until timestamptz,
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_update_time ON login_failures (update_time);

-- Addresses an account logged in from: a lock on the account does not hold them back.
CREATE TABLE login_known_addresses (
    account_key bytea NOT NULL,
    address_key bytea NOT NULL,
    last_success timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_key, address_key)
);
