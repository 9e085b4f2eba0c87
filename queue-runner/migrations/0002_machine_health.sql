-- What builders report in their pings, for operators and (later) for placing steps.
ALTER TABLE machines ADD COLUMN free_disk_bytes bigint;
ALTER TABLE machines ADD COLUMN last_ping_at timestamptz;
COMMENT ON COLUMN machines.free_disk_bytes IS 'Free bytes in the builder''s Nix store, from its latest ping.';
COMMENT ON COLUMN machines.last_ping_at IS 'When its latest ping arrived.';
