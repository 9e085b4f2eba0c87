-- Where a build's trace continues: the W3C trace context of its Submit, kept so that planning,
-- dispatch and the builder's spans (other tasks and processes, later) join the same trace.
-- Empty unless traces are exported (OTEL_EXPORTER_OTLP_ENDPOINT).
ALTER TABLE builds ADD COLUMN trace_parent text NOT NULL DEFAULT '';
ALTER TABLE steps ADD COLUMN trace_parent text NOT NULL DEFAULT '';
COMMENT ON COLUMN builds.trace_parent IS 'The W3C traceparent of the span that submitted it: planning it continues that trace. Empty when traces are not exported.';
COMMENT ON COLUMN steps.trace_parent IS 'The W3C traceparent of the span that planned it (for the build that created it): its dispatch and the builder''s spans continue that trace. Empty when traces are not exported.';
