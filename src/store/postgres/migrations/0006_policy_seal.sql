-- The seal that authenticates the shared caller policy: the policy's
-- SHA-256 sealed with AES-256-GCM under the master key named in
-- master_key_id. Replicas enforce a stored policy only when its seal opens
-- under that key and matches the document, so write access to the
-- database alone cannot change who may call stvault. A row stored before
-- this migration has no seal, and replicas ignore it until one of them
-- stores its policy again.
ALTER TABLE stvault_policy
    ADD COLUMN master_key_id text,
    ADD COLUMN seal bytea;
