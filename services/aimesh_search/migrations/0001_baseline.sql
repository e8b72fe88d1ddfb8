-- Baseline of the aimesh_search database: opens its migration history. The
-- tables behind SearchService arrive with the issue that builds its behaviour (#3).
SELECT 1;
