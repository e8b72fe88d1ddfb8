-- Baseline of the aimesh_recommend database: opens its migration history. The
-- tables behind RecommendService arrive with the issue that builds its behaviour (#4).
SELECT 1;
