-- Topic prefixes an admin lets a member publish under (issue 20), besides its
-- own apps.u<id>. namespace. Never one of the platform's topics.
CREATE TABLE topic_grants (
    id text PRIMARY KEY,
    topic_prefix text NOT NULL,
    grantee text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic_prefix, grantee)
);
CREATE INDEX topic_grants_page ON topic_grants (create_time, id);
