-- Collections, their documents with embeddings, and import jobs.
CREATE TABLE collections (
    id text PRIMARY KEY,
    display_name text NOT NULL DEFAULT '',
    embedding_model text NOT NULL,
    dimension integer NOT NULL,
    max_input_tokens integer NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE documents (
    collection_id text NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    id text NOT NULL,
    -- Stable FAISS id: kept when the document is replaced.
    vector_id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    text text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    owner text NOT NULL DEFAULT '',
    text_truncated boolean NOT NULL,
    -- float32 little-endian, `dimension` values: the index is rebuilt from these at start.
    embedding bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection_id, id)
);
CREATE INDEX documents_owner ON documents (owner) WHERE owner <> '';

CREATE TABLE import_jobs (
    collection_id text NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    id text NOT NULL,
    display_name text NOT NULL DEFAULT '',
    state text NOT NULL,
    total_bytes bigint NOT NULL DEFAULT 0,
    committed_bytes bigint NOT NULL DEFAULT 0,
    committed_lines bigint NOT NULL DEFAULT 0,
    upserted_documents bigint NOT NULL DEFAULT 0,
    truncated_documents bigint NOT NULL DEFAULT 0,
    failed_lines bigint NOT NULL DEFAULT 0,
    line_errors jsonb NOT NULL DEFAULT '[]',
    error_message text NOT NULL DEFAULT '',
    -- Set while a stream feeds the job; a job whose feeder died is INTERRUPTED.
    feeder text,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    end_time timestamptz,
    PRIMARY KEY (collection_id, id)
);
