-- Retries with backoff, and postponement: a step is not dispatched before its visible_after.
-- The runner sets it when a step's attempt failed for a reason not its own (the retry policy's
-- backoff); an administrator may set it to postpone a step without using one of its retries:
--   UPDATE steps SET visible_after = now() + interval '1 hour' WHERE id = 42;
-- (read when a build needing the step is ingested, and when the runner starts).
ALTER TABLE steps ADD COLUMN visible_after timestamptz;
COMMENT ON COLUMN steps.visible_after IS 'Not dispatched before this time: a retry''s backoff after an infrastructure failure, or a postponement. NULL or past: no hold.';
