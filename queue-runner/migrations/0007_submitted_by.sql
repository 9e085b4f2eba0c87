-- Who may cancel or restart a build: the identity that submitted it (and admins).
ALTER TABLE builds ADD COLUMN submitted_by text;
COMMENT ON COLUMN builds.submitted_by IS 'The identity (role/name, from its certificate) that submitted the build; NULL for builds queued with SQL, which only admins may cancel or restart.';
