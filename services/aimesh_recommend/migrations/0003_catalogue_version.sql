-- A number that every change to `items` raises, kept by a trigger: replicas
-- poll it and reread the catalogue only when it moved, instead of reading
-- every item id each refresh (at 100k items that reread took a sixth of a
-- serving replica's event loop). Catalogue writes are rare; the one row they
-- update serializes them, which they can afford.
CREATE TABLE catalogue_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version bigint NOT NULL
);

INSERT INTO catalogue_version (version) VALUES (1);

CREATE FUNCTION bump_catalogue_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalogue_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER items_bump_catalogue_version
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON items
FOR EACH STATEMENT EXECUTE FUNCTION bump_catalogue_version();
