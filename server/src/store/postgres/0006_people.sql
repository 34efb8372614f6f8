-- People: the OIDC identity providers they log in through, and the users who did.
CREATE TABLE login_providers (
    id uuid PRIMARY KEY,
    -- NULL: server-wide.
    tailnet_id uuid REFERENCES tailnets (id) ON DELETE CASCADE,
    name text NOT NULL,
    issuer text NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX login_providers_tailnet ON login_providers (tailnet_id);

CREATE TABLE users (
    id uuid PRIMARY KEY,
    issuer text NOT NULL,
    subject text NOT NULL,
    email text NOT NULL,
    last_login timestamptz NOT NULL,
    record jsonb NOT NULL,
    UNIQUE (issuer, subject)
);
CREATE INDEX users_email ON users (email);
