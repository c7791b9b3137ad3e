-- The audit trail that every replica appends to, as one hash chain. Each
-- row holds an event's stored bytes (the same JSON as a line of the file
-- trail) and the hex SHA-256 of those bytes, which the next event repeats
-- as its previous_hash.
CREATE TABLE stvault_audit_events (
    sequence bigint PRIMARY KEY CHECK (sequence > 0),
    event bytea NOT NULL,
    hash text NOT NULL
);

-- The chain head: the last event's sequence and hash, in a single row.
-- An append locks this row until it commits, so appends from every
-- replica take their sequence numbers one batch at a time, and deleting
-- events at the end of the chain is detectable.
CREATE TABLE stvault_audit_head (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    sequence bigint NOT NULL,
    hash text NOT NULL
);

INSERT INTO stvault_audit_head (id, sequence, hash)
VALUES (true, 0, '0000000000000000000000000000000000000000000000000000000000000000');
