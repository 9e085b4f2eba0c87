-- History pruning ([history] keep_days): a derivation is kept for the days after it was last
-- stored, so what a client stages again is not deleted before its job set names it.
COMMENT ON COLUMN derivations.created_at IS 'When the derivation was stored, or last stored again by a Submit or StageDerivations (moved at most once a day). History pruning ([history] keep_days) deletes derivations no step or build names that were last stored before its days; an evaluator inserting with SQL on such a farm should move it too (ON CONFLICT (path) DO UPDATE SET created_at = now()) for the derivations its builds need.';
COMMENT ON COLUMN steps.failed_build_id IS 'For a failed step: the oldest build that failed because of it, which later builds needing it name as the origin of their cached failure. May name a build history pruning deleted.';
-- What pruning asks for every derivation it deletes (and the foreign key asks PostgreSQL).
CREATE INDEX builds_by_drv_path ON builds (drv_path);
