-- What admins and failures decided about each builder: drained (no new work until enabled) and
-- quarantined (no work after infrastructure failures in a row, until a probation step
-- succeeds); and whether it is below the free disk floor or over the memory pressure limit.
-- The runner reads drained and quarantined back at start, so they survive a restart of either
-- side; the disk and memory holds are its latest ping's, cleared when the builder joins again.
-- `machine_status` is what `drover admin machines` shows.

ALTER TABLE machines ADD COLUMN drained_at timestamptz;
ALTER TABLE machines ADD COLUMN quarantined_at timestamptz;
ALTER TABLE machines ADD COLUMN quarantine_reason text;
ALTER TABLE machines ADD COLUMN probation_from timestamptz;
ALTER TABLE machines ADD COLUMN below_disk_floor boolean NOT NULL DEFAULT false;
ALTER TABLE machines ADD COLUMN memory_pressure_percent double precision;
ALTER TABLE machines ADD COLUMN under_memory_pressure boolean NOT NULL DEFAULT false;
ALTER TABLE machines ADD CONSTRAINT machines_quarantine_complete
    CHECK ((quarantined_at IS NULL) = (quarantine_reason IS NULL)
       AND (quarantined_at IS NULL) = (probation_from IS NULL));
COMMENT ON COLUMN machines.drained_at IS 'When an admin drained it (drover admin drain): it keeps its tunnel and finishes what it runs, but gets no new work until enabled. NULL: not drained.';
COMMENT ON COLUMN machines.quarantined_at IS 'When its quarantine began. NULL: not quarantined.';
COMMENT ON COLUMN machines.quarantine_reason IS 'Why it is quarantined: its infrastructure failures in a row (with the last message), a failed probation step, or the admin who imposed it.';
COMMENT ON COLUMN machines.below_disk_floor IS 'Whether its latest ping reported less free disk than [builders] min_free_disk_bytes: it gets no new work until a ping reports more.';
COMMENT ON COLUMN machines.memory_pressure_percent IS 'Its memory pressure at its latest ping that said: the share of the last 10 s some task stalled waiting for memory (the kernel''s PSI, some avg10), in percent. NULL: its kernel never said.';
COMMENT ON COLUMN machines.under_memory_pressure IS 'Whether that was over [builders] max_memory_pressure_percent: it gets no new work until a ping reports less.';
COMMENT ON COLUMN machines.probation_from IS 'When its cool-down ends: from then on it gets one probation step at a time, and a success lifts the quarantine.';

CREATE VIEW machine_status AS
    SELECT m.name,
           CASE
               WHEN NOT m.connected THEN 'disconnected'
               WHEN m.drained_at IS NOT NULL THEN 'drained'
               WHEN m.quarantined_at IS NOT NULL AND now() < m.probation_from THEN 'quarantined'
               WHEN m.quarantined_at IS NOT NULL THEN 'probation'
               WHEN m.below_disk_floor THEN 'low_disk'
               WHEN m.under_memory_pressure THEN 'memory_pressure'
               WHEN count(a.id) >= m.max_jobs THEN 'full'
               WHEN count(a.id) > 0 THEN 'busy'
               ELSE 'idle'
           END AS state,
           m.systems,
           m.max_jobs,
           count(a.id) AS running,
           coalesce(array_agg(s.drv_path ORDER BY a.started_at) FILTER (WHERE a.id IS NOT NULL),
                    '{}') AS running_steps,
           m.last_ping_at,
           m.free_disk_bytes,
           m.memory_pressure_percent,
           m.drained_at,
           m.quarantined_at,
           m.quarantine_reason,
           m.probation_from
    FROM machines m
    LEFT JOIN step_attempts a ON a.machine = m.name AND a.status = 'running'
    LEFT JOIN steps s ON s.id = a.step_id
    GROUP BY m.name;
COMMENT ON VIEW machine_status IS 'Each builder as drover admin machines shows it: its state (disconnected, drained, quarantined, probation, low_disk, memory_pressure, full, busy, idle; a builder shutting down shows as busy or idle until it leaves), load, running steps, last ping, free disk, and why it takes no work.';
COMMENT ON COLUMN machine_status.state IS 'disconnected, drained, quarantined (cooling down), probation (one step at a time), low_disk (below the free disk floor), memory_pressure (over the memory pressure limit), full, busy or idle, the first that applies.';
COMMENT ON COLUMN machine_status.running IS 'Attempts it runs now.';
COMMENT ON COLUMN machine_status.running_steps IS 'The derivations of those attempts, oldest first.';
COMMENT ON COLUMN machine_status.name IS 'Builder name, from its certificate.';
COMMENT ON COLUMN machine_status.systems IS 'Systems it builds for, as it offered at its latest join.';
COMMENT ON COLUMN machine_status.max_jobs IS 'Steps it runs at once.';
COMMENT ON COLUMN machine_status.last_ping_at IS 'When its latest ping arrived.';
COMMENT ON COLUMN machine_status.free_disk_bytes IS 'Free bytes in its Nix store, from its latest ping.';
COMMENT ON COLUMN machine_status.memory_pressure_percent IS 'Its memory pressure (PSI some avg10, percent), from its latest ping that said.';
COMMENT ON COLUMN machine_status.drained_at IS 'When an admin drained it; NULL: not drained.';
COMMENT ON COLUMN machine_status.quarantined_at IS 'When its quarantine began; NULL: not quarantined.';
COMMENT ON COLUMN machine_status.quarantine_reason IS 'Why it is quarantined.';
COMMENT ON COLUMN machine_status.probation_from IS 'When its cool-down ends and its probation begins.';

COMMENT ON COLUMN builds.global_priority IS 'Set by admins (drover admin priority); higher builds go before every build with a lower one, whatever their priority. An UPDATE by SQL takes effect when the build is next ingested (a runner restart); the admin command moves its queued steps at once.';

-- Why a step waits now also names drained and quarantined builders.
CREATE OR REPLACE VIEW step_waiting_reasons AS
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
         WHEN NOT EXISTS (SELECT 1 FROM machines m
                          WHERE m.connected
                            AND m.drained_at IS NULL
                            AND NOT m.below_disk_floor
                            AND NOT m.under_memory_pressure
                            AND (m.quarantined_at IS NULL OR m.probation_from <= now())
                            AND (s.system = 'builtin' OR s.system = ANY (m.systems))
                            AND s.required_features <@ (m.supported_features || m.mandatory_features)
                            AND m.mandatory_features <@ s.required_features) THEN
           'every connected builder that can run it is drained, quarantined, low on disk or under memory pressure (drover admin machines says which)'
         ELSE 'every builder that can run it is busy'
       END AS reason
FROM steps s
WHERE s.status IN ('waiting', 'runnable');
COMMENT ON VIEW step_waiting_reasons IS 'Why each waiting or runnable step has not started: its inputs, a backoff or postponement (visible_after), no connected builder for its system and features, every such builder drained, quarantined, low on disk or under memory pressure, or busy builders.';
