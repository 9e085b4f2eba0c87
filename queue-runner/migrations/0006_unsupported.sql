-- A step whose system or features no connected builder offers waits through a grace period
-- (builders.unsupported_grace_secs, long enough for a whole fleet to restart), then ends
-- `unsupported`, with a reason naming what it needs and whether any builder ever offered it.
ALTER TYPE step_status ADD VALUE 'unsupported' AFTER 'cancelled';

-- Runnable steps that no connected builder can take, and whether any builder ever could: what an
-- operator looks at when a queue does not move.
CREATE VIEW steps_without_a_builder AS
SELECT s.id, s.drv_path, s.system, s.required_features,
       EXISTS (SELECT 1 FROM machines m
               WHERE (s.system = 'builtin' OR s.system = ANY (m.systems))
                 AND s.required_features <@ (m.supported_features || m.mandatory_features)
                 AND m.mandatory_features <@ s.required_features) AS a_builder_ever_could
FROM steps s
WHERE s.status = 'runnable'
  AND NOT EXISTS (SELECT 1 FROM machines m
                  WHERE m.connected
                    AND (s.system = 'builtin' OR s.system = ANY (m.systems))
                    AND s.required_features <@ (m.supported_features || m.mandatory_features)
                    AND m.mandatory_features <@ s.required_features);
COMMENT ON VIEW steps_without_a_builder IS 'Runnable steps no connected builder can take (system, features): they end unsupported after builders.unsupported_grace_secs. a_builder_ever_could: some builder that joined once could.';
