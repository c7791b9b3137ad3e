-- How far each server's local audit spool has been forwarded into the
-- chain. A server spools events while the database is unreachable, and
-- forwards them later in transactions that also move forwarded_position
-- to the last spool position they append. A spool read again after a crash
-- therefore skips the positions recorded here, and no event enters the
-- chain twice. Spool ids are random and never reused, so rows are only
-- ever added or moved forward.
CREATE TABLE stvault_audit_spools (
    spool_id text PRIMARY KEY,
    forwarded_position bigint NOT NULL CHECK (forwarded_position > 0),
    forwarded_at timestamptz NOT NULL DEFAULT now()
);
