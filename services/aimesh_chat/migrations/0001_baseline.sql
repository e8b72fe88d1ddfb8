-- Baseline of the aimesh_chat database: opens its migration history. The
-- tables behind ChatService arrive with the issue that builds its behaviour (#5).
SELECT 1;
