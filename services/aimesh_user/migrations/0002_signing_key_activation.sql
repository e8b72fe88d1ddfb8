-- A rotated-in key is published before it signs, so cached JWKS copies
-- (Envoy's, other replicas') know it before any token carries its kid.
ALTER TABLE signing_keys ADD COLUMN activate_time timestamptz NOT NULL DEFAULT now();
