-- Which steps a build needs is derived from the edges between steps instead of stored per build:
-- the builds of a job set share one graph, and a row per build and closure step cost the sum of
-- their closures (tens of millions of rows for an evaluation of nixpkgs).

CREATE TABLE step_inputs (
    step_id   bigint NOT NULL REFERENCES steps (id),
    input_id  bigint NOT NULL REFERENCES steps (id),
    PRIMARY KEY (step_id, input_id)
);
COMMENT ON TABLE step_inputs IS 'The edges of the step graph: each step and the steps building its input derivations, written when the step is created. Steps that succeeded before a build was planned are not descended into, so their inputs may have no rows.';
COMMENT ON COLUMN step_inputs.step_id IS 'A step.';
COMMENT ON COLUMN step_inputs.input_id IS 'A step building one of its input derivations.';

ALTER TABLE steps ADD COLUMN failed_build_id bigint;
COMMENT ON COLUMN steps.failed_build_id IS 'For a failed step: the oldest build that failed because of it, which later builds needing it name as the origin of their cached failure.';

COMMENT ON TABLE build_steps IS 'Legacy: the steps each build needed, as runners before schema version 11 recorded them; no longer written. Read steps_of_build(id) instead.';

CREATE FUNCTION steps_of_build(build bigint) RETURNS TABLE (step_id bigint)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE planned AS (
        SELECT ingested_at, drv_path FROM builds WHERE id = build AND ingested_at IS NOT NULL
    ),
    closure(id, needed) AS (
        SELECT s.id, NOT (s.status = 'succeeded' AND s.finished_at <= p.ingested_at)
        FROM planned p JOIN steps s ON s.drv_path = p.drv_path
      UNION
        SELECT s.id, NOT (s.status = 'succeeded' AND s.finished_at <= p.ingested_at)
        FROM closure c
        JOIN step_inputs i ON i.step_id = c.id
        JOIN steps s ON s.id = i.input_id
        CROSS JOIN planned p
        WHERE c.needed
    )
    SELECT id FROM closure WHERE needed
    UNION
    SELECT bs.step_id FROM build_steps bs WHERE bs.build_id = build
$$;
COMMENT ON FUNCTION steps_of_build(bigint) IS 'The steps a build needed when the runner planned it: its closure through step_inputs, less the steps that had succeeded (or were found in a cache) by then.';
