-- Which key-encryption key sealed each signing key (aimesh_user.signing.key_id),
-- so AIMESH_USER_KEY_ENCRYPTION_KEY can rotate. NULL: sealed before key ids.
ALTER TABLE signing_keys ADD COLUMN kek_id text;
