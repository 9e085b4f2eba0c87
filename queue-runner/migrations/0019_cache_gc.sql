-- Garbage collection of the binary cache: builds an admin pinned stay whatever their age, and
-- every sweep is recorded so operators can see what it kept, freed and dropped.
ALTER TABLE builds ADD COLUMN pinned_at timestamptz;
ALTER TABLE builds ADD COLUMN pinned_by text;
COMMENT ON COLUMN builds.pinned_at IS 'When an admin pinned it (drover admin pin): its outputs and their closure stay in the cache whatever its age and the size bound. NULL: not pinned.';
COMMENT ON COLUMN builds.pinned_by IS 'The admin who pinned it (role/name).';
CREATE INDEX builds_finished_at ON builds (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX builds_pinned ON builds (id) WHERE pinned_at IS NOT NULL;

CREATE TABLE cache_sweeps (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    roots           integer NOT NULL,
    paths_kept      bigint NOT NULL,
    bytes_kept      bigint NOT NULL,
    paths_deleted   bigint NOT NULL,
    bytes_freed     bigint NOT NULL,
    dropped_builds  bigint[] NOT NULL,
    protected_bytes bigint NOT NULL
);
COMMENT ON TABLE cache_sweeps IS 'Each garbage collection of the binary cache the runner completed, newest last ([gc] in the runner''s configuration).';
COMMENT ON COLUMN cache_sweeps.id IS 'Sweep id, in the order sweeps completed.';
COMMENT ON COLUMN cache_sweeps.started_at IS 'When it began marking.';
COMMENT ON COLUMN cache_sweeps.finished_at IS 'When it had deleted everything it would.';
COMMENT ON COLUMN cache_sweeps.roots IS 'Builds whose paths it kept (live ones counted as one root).';
COMMENT ON COLUMN cache_sweeps.paths_kept IS 'Store paths left in the cache.';
COMMENT ON COLUMN cache_sweeps.bytes_kept IS 'Compressed NAR bytes left in the cache.';
COMMENT ON COLUMN cache_sweeps.paths_deleted IS 'Store paths whose narinfo it deleted.';
COMMENT ON COLUMN cache_sweeps.bytes_freed IS 'Compressed NAR bytes it deleted.';
COMMENT ON COLUMN cache_sweeps.dropped_builds IS 'Builds still wanted by age or key whose outputs it deleted to stay under [gc] max_bytes, newest first.';
COMMENT ON COLUMN cache_sweeps.protected_bytes IS 'Bytes that stay whatever the size bound: live and pinned builds and paths within the grace period. Over max_bytes, the bound cannot be met.';

-- Step logs expire ([logs] keep_days): the attempt keeps a note that its log existed.
ALTER TABLE step_attempts ADD COLUMN log_expired_at timestamptz;
COMMENT ON COLUMN step_attempts.log_expired_at IS 'When its log was deleted for its age ([logs] keep_days); log_file is NULL from then on. NULL: the log is kept, or there never was one.';
CREATE INDEX step_attempts_log_age ON step_attempts (finished_at) WHERE log_file IS NOT NULL;
