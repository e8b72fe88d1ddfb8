-- Baseline of the aimesh_chat database: opens its migration history. The
-- tables behind ChatService arrive with the issue that builds its behaviour (#5).
COMMENT ON SCHEMA public IS 'aimesh chat service: owned by it alone';
