-- Job sets: the builds of one evaluation queued together, all or none, and a newer evaluation
-- of the same series superseding the older ones.

CREATE TABLE job_sets (
    id                 bigserial PRIMARY KEY,
    series             text,
    supersede          boolean NOT NULL DEFAULT false,
    submitted_by       text NOT NULL,
    idempotency_key    text,
    submitted_at       timestamptz NOT NULL DEFAULT now(),
    superseded_older_at timestamptz
);
COMMENT ON TABLE job_sets IS 'Builds queued together by one SubmitJobSet (an evaluation of a CI jobset): each build names its job set and job.';
COMMENT ON COLUMN job_sets.id IS 'Job set id, as returned by SubmitJobSet.';
COMMENT ON COLUMN job_sets.series IS 'What the job set is an evaluation of (a branch, a jobset name); NULL: none.';
COMMENT ON COLUMN job_sets.supersede IS 'Whether, once all its builds are planned, the unfinished builds of older job sets of the same series and submitter are cancelled.';
COMMENT ON COLUMN job_sets.submitted_by IS 'The identity (role:name) that submitted it.';
COMMENT ON COLUMN job_sets.idempotency_key IS 'The key a client gave its SubmitJobSet so a retried call returns this job set; unique per submitter.';
COMMENT ON COLUMN job_sets.submitted_at IS 'When it was queued.';
COMMENT ON COLUMN job_sets.superseded_older_at IS 'When the runner cancelled what older job sets of its series still had running; NULL while it has not (or does not supersede).';

CREATE UNIQUE INDEX job_sets_by_idempotency_key ON job_sets (submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX job_sets_by_series ON job_sets (series, id) WHERE series IS NOT NULL;
CREATE INDEX job_sets_superseding ON job_sets (id) WHERE supersede AND superseded_older_at IS NULL;

ALTER TABLE builds ADD COLUMN job_set_id bigint REFERENCES job_sets (id);
ALTER TABLE builds ADD COLUMN job_name text;
COMMENT ON COLUMN builds.job_set_id IS 'The job set that queued the build; NULL for a build of its own (Submit, or SQL).';
COMMENT ON COLUMN builds.job_name IS 'The job (attribute path) of its job set the build is for.';
CREATE UNIQUE INDEX builds_by_job ON builds (job_set_id, job_name) WHERE job_set_id IS NOT NULL;
