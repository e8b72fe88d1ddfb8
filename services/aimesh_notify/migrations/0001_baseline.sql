-- Baseline of the aimesh_notify database: opens its migration history. The
-- tables behind NotifyService arrive with the issue that builds its behaviour (#6).
SELECT 1;
