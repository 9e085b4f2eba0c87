-- Derivation texts are compressed with lz4 where the server has it (PostgreSQL 14 and later,
-- built with lz4, as Debian's and nixpkgs' are): pglz took a third of the database's CPU while
-- a nixpkgs-sized job set was staged, and lz4 compresses several times faster. Rows stored
-- before keep pglz; PostgreSQL reads both. Elsewhere the texts stay with the default.

DO $$
BEGIN
    IF current_setting('server_version_num')::integer >= 140000 THEN
        EXECUTE 'ALTER TABLE derivations ALTER COLUMN text SET COMPRESSION lz4';
    END IF;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: derivation texts stay compressed with pglz';
END
$$;
