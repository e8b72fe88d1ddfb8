-- Service accounts' keys carry the mesh.service scope (issue 20: the ownership
-- rules tell a backend acting for the platform from a member by it). Keys made
-- before it existed get it too; a key's scopes are still cut to its owner's roles.
UPDATE api_keys SET scopes = array_append(scopes, 'mesh.service')
WHERE NOT ('mesh.service' = ANY (scopes))
  AND user_id IN (SELECT id FROM users WHERE 'service' = ANY (roles));
