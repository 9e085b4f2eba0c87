-- A build needing a derivation that already failed on its own ends at once, naming the original
-- failure; and a build may ask to keep building what it can after one of its steps failed.
ALTER TYPE build_status ADD VALUE 'cached_failure';
COMMENT ON TYPE build_status IS 'Lifecycle of a build: queued until one of its steps runs, then running, then one terminal state. cached_failure: it needs a derivation that had failed on its own in an earlier build, and nothing was built (restarting it, or the build that failed, clears that failure).';
ALTER TABLE builds ADD COLUMN keep_going boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN builds.keep_going IS 'After one of its steps fails, build every step of it that can still be built (true), or cancel the steps no other live build needs (false, the default).';
