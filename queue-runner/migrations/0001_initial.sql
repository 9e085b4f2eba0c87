-- drover's queue, version 1. Every table and column carries a comment: operators query this
-- schema directly, so it documents itself (\d+ in psql).

CREATE TYPE build_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'dep_failed', 'cancelled');
COMMENT ON TYPE build_status IS 'Lifecycle of a build: queued until one of its steps runs, then running, then one terminal state.';

CREATE TYPE step_status AS ENUM ('waiting', 'runnable', 'running', 'succeeded', 'failed', 'dep_failed', 'cancelled');
COMMENT ON TYPE step_status IS 'Lifecycle of a step: waiting for its inputs, runnable, running on a builder, then one terminal state.';

CREATE TYPE attempt_status AS ENUM ('running', 'succeeded', 'failed', 'timed_out', 'infrastructure_failure', 'builder_lost', 'aborted');
COMMENT ON TYPE attempt_status IS 'Outcome of one dispatch of a step to a builder.';

CREATE TABLE derivations (
    path        text PRIMARY KEY,
    text        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE derivations IS 'Derivation files known to the farm. Rows may be inserted by the runner (Submit) or directly by an evaluator; the runner verifies every derivation before it builds it.';
COMMENT ON COLUMN derivations.path IS 'Store path of the .drv file, /nix/store/<hash>-<name>.drv.';
COMMENT ON COLUMN derivations.text IS 'The exact bytes of the .drv file (ATerm; not always UTF-8).';
COMMENT ON COLUMN derivations.created_at IS 'When the derivation was first stored.';

CREATE TABLE builds (
    id              bigserial PRIMARY KEY,
    drv_path        text NOT NULL REFERENCES derivations (path),
    status          build_status NOT NULL DEFAULT 'queued',
    priority        integer NOT NULL DEFAULT 0,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    submitted_at    timestamptz NOT NULL DEFAULT now(),
    ingested_at     timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    failure_reason  text
);
COMMENT ON TABLE builds IS 'Requests to build a top-level derivation. Insert a row (after its derivations) to queue a build; the runner picks it up through ingested_at.';
COMMENT ON COLUMN builds.id IS 'Build id, as returned by Submit.';
COMMENT ON COLUMN builds.drv_path IS 'The top-level derivation to build.';
COMMENT ON COLUMN builds.status IS 'Where the build is in its lifecycle.';
COMMENT ON COLUMN builds.priority IS 'Higher builds are dispatched first.';
COMMENT ON COLUMN builds.metadata IS 'Caller-supplied string map, returned unchanged.';
COMMENT ON COLUMN builds.submitted_at IS 'When the build was queued.';
COMMENT ON COLUMN builds.ingested_at IS 'When the runner expanded the build into steps; NULL marks a build the runner has not seen yet.';
COMMENT ON COLUMN builds.started_at IS 'When the first of its steps started.';
COMMENT ON COLUMN builds.finished_at IS 'When the build reached a terminal status.';
COMMENT ON COLUMN builds.failure_reason IS 'Why the build did not succeed, for humans.';

CREATE INDEX builds_not_ingested ON builds (id) WHERE ingested_at IS NULL;
CREATE INDEX builds_unfinished ON builds (id) WHERE finished_at IS NULL;

CREATE FUNCTION notify_builds_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('drover_builds_queued', '');
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION notify_builds_queued() IS 'Wakes the runner once per statement that queues builds. Only a wake-up: the runner finds new builds by ingested_at IS NULL.';

CREATE TRIGGER builds_queued AFTER INSERT ON builds
    FOR EACH STATEMENT EXECUTE FUNCTION notify_builds_queued();

CREATE TABLE steps (
    id              bigserial PRIMARY KEY,
    drv_path        text NOT NULL UNIQUE REFERENCES derivations (path),
    status          step_status NOT NULL,
    system          text NOT NULL,
    required_features text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    builder_losses  integer NOT NULL DEFAULT 0,
    infrastructure_failures integer NOT NULL DEFAULT 0,
    failure_reason  text
);
COMMENT ON TABLE steps IS 'One build step per derivation that must be built; builds that share a derivation share its step.';
COMMENT ON COLUMN steps.id IS 'Step id.';
COMMENT ON COLUMN steps.drv_path IS 'The derivation this step builds.';
COMMENT ON COLUMN steps.status IS 'Where the step is in its lifecycle.';
COMMENT ON COLUMN steps.system IS 'The system a builder must offer (builtin runs anywhere).';
COMMENT ON COLUMN steps.required_features IS 'Features a builder must offer (requiredSystemFeatures).';
COMMENT ON COLUMN steps.created_at IS 'When the step was created.';
COMMENT ON COLUMN steps.started_at IS 'When its latest attempt started.';
COMMENT ON COLUMN steps.finished_at IS 'When it reached a terminal status.';
COMMENT ON COLUMN steps.builder_losses IS 'Attempts lost to builders that disconnected; these do not count as build failures.';
COMMENT ON COLUMN steps.infrastructure_failures IS 'Attempts that failed for reasons other than the build (disk, store); retried elsewhere up to a limit.';
COMMENT ON COLUMN steps.failure_reason IS 'Why the step did not succeed, for humans.';

CREATE INDEX steps_unfinished ON steps (id) WHERE finished_at IS NULL;

CREATE TABLE build_steps (
    build_id  bigint NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    step_id   bigint NOT NULL REFERENCES steps (id),
    PRIMARY KEY (build_id, step_id)
);
COMMENT ON TABLE build_steps IS 'Which steps each build needs (its derivation closure, less what was already built).';
COMMENT ON COLUMN build_steps.build_id IS 'The build.';
COMMENT ON COLUMN build_steps.step_id IS 'A step it needs.';
CREATE INDEX build_steps_by_step ON build_steps (step_id);

CREATE TABLE machines (
    name                text PRIMARY KEY,
    systems             text[] NOT NULL,
    supported_features  text[] NOT NULL,
    mandatory_features  text[] NOT NULL,
    max_jobs            integer NOT NULL,
    speed_factor        double precision NOT NULL,
    nix_version         text NOT NULL,
    connected           boolean NOT NULL,
    first_seen_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE machines IS 'Builders that have joined, with what they offered at their latest join.';
COMMENT ON COLUMN machines.name IS 'Builder name, from its certificate.';
COMMENT ON COLUMN machines.systems IS 'Systems it builds for.';
COMMENT ON COLUMN machines.supported_features IS 'Features it offers.';
COMMENT ON COLUMN machines.mandatory_features IS 'Features a step must require to run on it.';
COMMENT ON COLUMN machines.max_jobs IS 'Steps it runs at once.';
COMMENT ON COLUMN machines.speed_factor IS 'Relative speed; faster builders are preferred.';
COMMENT ON COLUMN machines.nix_version IS 'Its Nix version.';
COMMENT ON COLUMN machines.connected IS 'Whether it holds a tunnel now.';
COMMENT ON COLUMN machines.first_seen_at IS 'When it first joined.';
COMMENT ON COLUMN machines.last_seen_at IS 'When it last joined or left.';

CREATE TABLE step_attempts (
    id           uuid PRIMARY KEY,
    step_id      bigint NOT NULL REFERENCES steps (id),
    machine      text NOT NULL REFERENCES machines (name),
    status       attempt_status NOT NULL DEFAULT 'running',
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    message      text,
    log_file     text
);
COMMENT ON TABLE step_attempts IS 'Each dispatch of a step to a builder; the id is the attempt id builders quote.';
COMMENT ON COLUMN step_attempts.id IS 'Attempt id.';
COMMENT ON COLUMN step_attempts.step_id IS 'The step.';
COMMENT ON COLUMN step_attempts.machine IS 'The builder it was given to.';
COMMENT ON COLUMN step_attempts.status IS 'Its outcome, or running.';
COMMENT ON COLUMN step_attempts.started_at IS 'When it was dispatched.';
COMMENT ON COLUMN step_attempts.finished_at IS 'When its outcome was recorded.';
COMMENT ON COLUMN step_attempts.message IS 'The builder''s reason for anything but success.';
COMMENT ON COLUMN step_attempts.log_file IS 'The zstd-compressed log, relative to the runner''s log directory.';
CREATE INDEX step_attempts_by_step ON step_attempts (step_id);

CREATE TABLE step_outputs (
    step_id      bigint NOT NULL REFERENCES steps (id),
    output_name  text NOT NULL,
    path         text NOT NULL,
    nar_hash     text,
    nar_size     bigint,
    PRIMARY KEY (step_id, output_name)
);
COMMENT ON TABLE step_outputs IS 'Outputs of successful steps.';
COMMENT ON COLUMN step_outputs.step_id IS 'The step.';
COMMENT ON COLUMN step_outputs.output_name IS 'Output name (out, dev, ...).';
COMMENT ON COLUMN step_outputs.path IS 'Output store path.';
COMMENT ON COLUMN step_outputs.nar_hash IS 'sha256:<nix base32> of its NAR, as reported.';
COMMENT ON COLUMN step_outputs.nar_size IS 'Size of its NAR in bytes, as reported.';

CREATE VIEW queue_summary AS
    SELECT status, system, count(*) AS steps
    FROM steps WHERE finished_at IS NULL
    GROUP BY status, system;
COMMENT ON VIEW queue_summary IS 'Unfinished steps by status and system.';

CREATE VIEW running_steps AS
    SELECT a.id AS attempt_id, s.id AS step_id, s.drv_path, a.machine, a.started_at,
           now() - a.started_at AS running_for
    FROM step_attempts a JOIN steps s ON s.id = a.step_id
    WHERE a.status = 'running';
COMMENT ON VIEW running_steps IS 'Attempts in progress, longest-running last.';

CREATE VIEW machine_load AS
    SELECT m.name, m.connected, m.max_jobs,
           count(a.id) FILTER (WHERE a.status = 'running') AS running
    FROM machines m LEFT JOIN step_attempts a ON a.machine = m.name
    GROUP BY m.name, m.connected, m.max_jobs;
COMMENT ON VIEW machine_load IS 'Each builder with its running attempts against its capacity.';
