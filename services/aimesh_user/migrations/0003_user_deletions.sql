-- Deleting a user everywhere is a saga whose state lives here, so a crash at
-- any step resumes where it stopped (aimesh_user.saga).

-- Set while the user is being deleted: no login, refresh or API key works.
ALTER TABLE users ADD COLUMN disable_time timestamptz;

CREATE TABLE user_deletions (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    actor text NOT NULL,
    state text NOT NULL DEFAULT 'RUNNING' CHECK (state IN ('RUNNING', 'SUCCEEDED', 'ABORTED')),
    abort_reason text NOT NULL DEFAULT '',
    -- The process running it; another takes over once the lease lapses.
    lease_owner text,
    lease_until timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    end_time timestamptz
);
CREATE UNIQUE INDEX user_deletions_one_running ON user_deletions (user_id) WHERE state = 'RUNNING';

CREATE TABLE user_deletion_steps (
    deletion_id text NOT NULL REFERENCES user_deletions (id) ON DELETE CASCADE,
    position integer NOT NULL,
    service text NOT NULL,
    state text NOT NULL DEFAULT 'PENDING'
        CHECK (state IN ('PENDING', 'SUCCEEDED', 'SKIPPED', 'FAILED')),
    attempts integer NOT NULL DEFAULT 0,
    last_error text NOT NULL DEFAULT '',
    deleted_count bigint NOT NULL DEFAULT 0,
    next_attempt_time timestamptz,
    end_time timestamptz,
    PRIMARY KEY (deletion_id, position)
);
