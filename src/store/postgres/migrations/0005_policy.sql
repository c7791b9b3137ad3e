-- The caller policy shared by replicas that enforce one: the text of the
-- policy file that a replica loaded last, at startup or on SIGHUP, with
-- its SHA-256. Every such replica then enforces this text. The policy
-- names bearer keys by their SHA-256 only, never the keys.
CREATE TABLE stvault_policy (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    document text NOT NULL,
    sha256 text NOT NULL,
    loaded_by text NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now()
);
