-- Admin credentials made through the API: a role and an optional owner scope; the secret only as a hash.
-- Revoked tokens stay, for the record.
CREATE TABLE admin_tokens (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    secret_hash bytea NOT NULL UNIQUE,
    record jsonb NOT NULL
);
CREATE INDEX admin_tokens_name ON admin_tokens (name);
