-- What the build API needs: idempotent submissions, why each step waits, and the admission cap.

ALTER TABLE builds ADD COLUMN idempotency_key text;
COMMENT ON COLUMN builds.idempotency_key IS 'The key a client gave its Submit so a retried Submit returns this build instead of queueing another; unique per submitter.';
CREATE UNIQUE INDEX builds_by_idempotency_key ON builds (submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX builds_by_submission_time ON builds (submitted_at);
CREATE INDEX steps_queued ON steps (id) WHERE status IN ('waiting', 'runnable');

CREATE VIEW step_waiting_reasons AS
SELECT s.id AS step_id,
       CASE
         WHEN s.status = 'waiting' THEN 'waiting for its inputs to be built'
         WHEN s.visible_after > now() THEN
           'held back until ' || to_char(s.visible_after AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
           || CASE WHEN s.infrastructure_failures > 0 THEN ' (backoff after an infrastructure failure)'
                   ELSE ' (postponed)' END
         WHEN NOT EXISTS (SELECT 1 FROM machines m
                          WHERE m.connected
                            AND (s.system = 'builtin' OR s.system = ANY (m.systems))
                            AND s.required_features <@ (m.supported_features || m.mandatory_features)
                            AND m.mandatory_features <@ s.required_features) THEN
           'no connected builder offers system ' || s.system
           || coalesce(' with features ' || nullif(array_to_string(s.required_features, ', '), ''), '')
           || CASE WHEN EXISTS (SELECT 1 FROM machines m
                                WHERE (s.system = 'builtin' OR s.system = ANY (m.systems))
                                  AND s.required_features <@ (m.supported_features || m.mandatory_features)
                                  AND m.mandatory_features <@ s.required_features)
                   THEN ' (a builder that did has disconnected)'
                   ELSE ' (no builder ever has)' END
         ELSE 'every builder that can run it is busy'
       END AS reason
FROM steps s
WHERE s.status IN ('waiting', 'runnable');
COMMENT ON VIEW step_waiting_reasons IS 'Why each waiting or runnable step has not started: its inputs, a backoff or postponement (visible_after), no connected builder for its system and features, or busy builders.';

CREATE TABLE farm_limits (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_queued_steps integer NOT NULL DEFAULT 100000 CHECK (max_queued_steps >= 0)
);
COMMENT ON TABLE farm_limits IS 'Farm-wide limits, one row, changed with SQL (UPDATE farm_limits SET …); read on every Submit.';
COMMENT ON COLUMN farm_limits.singleton IS 'Always true: the table has one row.';
COMMENT ON COLUMN farm_limits.max_queued_steps IS 'Admission cap: a Submit that would bring the steps waiting or runnable past this many is refused with RESOURCE_EXHAUSTED and a retry-after hint, and writes nothing.';
INSERT INTO farm_limits DEFAULT VALUES;
