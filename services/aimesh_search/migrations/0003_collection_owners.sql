-- Collections get an owner and a visibility (issue 20). Collections made before
-- owners existed belong to the platform (owner '': admins and service accounts
-- manage them) and stay readable by every member, as they were; new ones are
-- private to their creator unless created with VISIBILITY_ORGANISATION.
ALTER TABLE collections ADD COLUMN owner text NOT NULL DEFAULT '';
ALTER TABLE collections ADD COLUMN visibility text NOT NULL DEFAULT 'ORGANISATION';
ALTER TABLE collections ALTER COLUMN visibility SET DEFAULT 'PRIVATE';
ALTER TABLE collections ADD CONSTRAINT collections_visibility
    CHECK (visibility IN ('PRIVATE', 'ORGANISATION'));
CREATE INDEX collections_owner ON collections (owner);
