-- Baseline of the aimesh_recommend database: opens its migration history. The
-- tables behind RecommendService arrive with the issue that builds its behaviour (#4).
COMMENT ON SCHEMA public IS 'aimesh recommend service: owned by it alone';
