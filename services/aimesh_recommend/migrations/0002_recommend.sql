-- Interactions, the item catalogue, training jobs, the model registry and servings.

-- One row per client-supplied interaction id: a repeat is a no-op.
CREATE TABLE interactions (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    item_id text NOT NULL,
    kind smallint NOT NULL CHECK (kind BETWEEN 1 AND 4),
    weight double precision NOT NULL CHECK (weight >= 0 AND weight <> 'NaN'),
    event_time timestamptz NOT NULL,
    -- RecommendResponse.serving_id the outcome is attributed to; '' for none.
    serving_id text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX interactions_user ON interactions (user_id);
CREATE INDEX interactions_item ON interactions (item_id);
CREATE INDEX interactions_serving ON interactions (serving_id) WHERE serving_id <> '';

CREATE TABLE items (
    id text PRIMARY KEY,
    text text NOT NULL DEFAULT '',
    metadata jsonb NOT NULL DEFAULT '{}',
    content_embedded boolean NOT NULL DEFAULT false,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE training_jobs (
    id text PRIMARY KEY,
    model_version text NOT NULL,
    epochs integer NOT NULL,
    state text NOT NULL CHECK (state IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    completed_epochs integer NOT NULL DEFAULT 0,
    progress double precision NOT NULL DEFAULT 0,
    loss double precision NOT NULL DEFAULT 0,
    training_interactions bigint NOT NULL DEFAULT 0,
    error_message text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    end_time timestamptz
);

-- The registry. The artifact is a torch state dict of plain tensors (loaded with
-- weights_only=True, so never an arbitrary pickle); ids map rows to users and items.
CREATE TABLE model_versions (
    version text PRIMARY KEY,
    seq bigserial NOT NULL UNIQUE,
    status text NOT NULL CHECK (status IN ('TRAINING', 'READY', 'FAILED')),
    metrics jsonb NOT NULL DEFAULT '{}',
    artifact bytea,
    user_ids text[] NOT NULL DEFAULT '{}',
    item_ids text[] NOT NULL DEFAULT '{}',
    training_job text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

-- Who was served by which version: the exposures of an experiment. Written in
-- batches off the request path.
CREATE TABLE servings (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    model_version text NOT NULL,
    fallback_reason text NOT NULL DEFAULT '',
    serve_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX servings_version ON servings (model_version, serve_time);
