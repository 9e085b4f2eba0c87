-- An administrator's lever over the whole queue: a build's global priority beats every other
-- order (build priority, critical path, submit order). Set it with SQL for now:
--   UPDATE builds SET global_priority = 100 WHERE id = 42;
-- The runner reads it when it ingests the build.
ALTER TABLE builds ADD COLUMN global_priority integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN builds.global_priority IS 'Set by administrators; higher builds go before every build with a lower one, whatever their priority. Read at ingest.';
