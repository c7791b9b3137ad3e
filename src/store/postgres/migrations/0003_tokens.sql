-- Access tokens shared between replicas, one row per connection, so that
-- several replicas cost ServiceTitan the token requests of one. The token
-- is sealed under the connection's data key; the database never sees it in
-- plaintext.
--
-- A replica asks ServiceTitan for a new token only while it holds the
-- row's lease (lease_owner until lease_until, by the database's clock). A
-- replica that dies mid-request loses the lease when it lapses. Every
-- grant increments lease_seq, and a token is stored only under the
-- lease_seq it was requested with, so a replica whose lease lapsed cannot
-- overwrite a newer token. retry_at holds a pause that ServiceTitan asked
-- for with HTTP 429, which every replica honours.
--
-- The token's type, expiry (milliseconds since the Unix epoch, by the
-- database's clock) and lifetime are bound to the sealed token as
-- associated data, so a row edited in the database does not open.
CREATE TABLE stvault_tokens (
    connection_id text COLLATE "C" PRIMARY KEY
        REFERENCES stvault_connections (id) ON DELETE CASCADE,
    version integer NOT NULL,
    token bytea,
    token_type text,
    expires_at_ms bigint,
    lifetime_ms bigint,
    lease_owner text,
    lease_until timestamptz,
    lease_seq bigint NOT NULL DEFAULT 0,
    retry_at timestamptz
);
