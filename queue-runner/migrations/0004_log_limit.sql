-- Builders now tell a build that printed more log than its limit allows from one that failed:
-- Nix's serve protocol reports it as its own status. Such an attempt ends `log_limit`; the step
-- fails for good, like `failed` and `timed_out`.
ALTER TYPE attempt_status ADD VALUE 'log_limit' AFTER 'timed_out';
COMMENT ON TYPE attempt_status IS 'How one dispatch of a step ended: running, succeeded, failed (the build''s own fault), timed_out, log_limit (printed more than max_log_bytes), infrastructure_failure (retried), builder_lost (requeued without using a retry), aborted.';
