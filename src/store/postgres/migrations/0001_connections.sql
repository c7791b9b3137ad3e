-- Connection records, stored as the same sealed JSON bytes as in sled.
-- The environment and tenant columns repeat two fields of the record so
-- that the unique constraint keeps one connection per tenant across every
-- replica. Ids sort by byte ("C" collation), as in sled, so pages keep
-- their order whatever the database's collation.
CREATE TABLE stvault_connections (
    id text COLLATE "C" PRIMARY KEY,
    environment text NOT NULL,
    tenant_id bigint NOT NULL,
    record bytea NOT NULL,
    CONSTRAINT stvault_connections_tenant_key UNIQUE (environment, tenant_id)
);

-- One sealed check value per master key, so a server started with the
-- wrong key file is rejected even before any connection exists.
CREATE TABLE stvault_master_key_checks (
    key_id text COLLATE "C" PRIMARY KEY,
    sealed bytea NOT NULL
);
