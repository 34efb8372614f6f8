-- Cordon schema version 1. Records are kept whole in `record` (the same JSON the sled engine stores);
-- the columns beside it are what queries filter, join and index on, and what operators SELECT.

CREATE TABLE meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The revision of the last committed change. Every transaction that publishes changes updates
    -- this row just before it commits, so revisions follow commit order and none is skipped.
    revision bigint NOT NULL
);
INSERT INTO meta (revision) VALUES (0);

CREATE TABLE tailnets (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    owner text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    record jsonb NOT NULL
);
CREATE INDEX tailnets_owner ON tailnets (owner, id);

CREATE TABLE nodes (
    id uuid PRIMARY KEY,
    tailnet_id uuid NOT NULL REFERENCES tailnets (id) ON DELETE CASCADE,
    address bigint NOT NULL,
    hostname text NOT NULL,
    wireguard_key bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    record jsonb NOT NULL,
    UNIQUE (tailnet_id, address),
    UNIQUE (tailnet_id, hostname),
    UNIQUE (tailnet_id, wireguard_key)
);

CREATE TABLE sessions (
    token_hash bytea PRIMARY KEY,
    node_id uuid NOT NULL UNIQUE REFERENCES nodes (id) ON DELETE CASCADE
);

CREATE TABLE auth_keys (
    id uuid PRIMARY KEY,
    tailnet_id uuid NOT NULL REFERENCES tailnets (id) ON DELETE CASCADE,
    secret_hash bytea NOT NULL UNIQUE,
    record jsonb NOT NULL
);
CREATE INDEX auth_keys_tailnet ON auth_keys (tailnet_id, id);

CREATE TABLE trust_rules (
    id uuid PRIMARY KEY,
    tailnet_id uuid NOT NULL REFERENCES tailnets (id) ON DELETE CASCADE,
    issuer text NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX trust_rules_tailnet ON trust_rules (tailnet_id, id);
CREATE INDEX trust_rules_issuer ON trust_rules (issuer);

CREATE TABLE policy_versions (
    tailnet_id uuid NOT NULL REFERENCES tailnets (id) ON DELETE CASCADE,
    version bigint NOT NULL,
    author text NOT NULL,
    created_at timestamptz NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (tailnet_id, version)
);

-- Write-only: only the gateway reads a key, to call its upstream.
CREATE TABLE upstream_keys (
    tailnet_id uuid NOT NULL REFERENCES tailnets (id) ON DELETE CASCADE,
    name text NOT NULL,
    api_key text NOT NULL,
    PRIMARY KEY (tailnet_id, name)
);

CREATE TABLE gateways (
    tailnet_id uuid PRIMARY KEY REFERENCES tailnets (id) ON DELETE CASCADE,
    node_id uuid NOT NULL,
    private_key bytea NOT NULL
);

-- The audit log outlives its tailnets: no foreign keys.
CREATE TABLE events (
    revision bigint PRIMARY KEY,
    id uuid NOT NULL,
    time timestamptz NOT NULL,
    kind text NOT NULL,
    tailnet_id uuid,
    node_id uuid,
    actor text NOT NULL,
    summary text NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX events_tailnet_revision ON events (tailnet_id, revision);
CREATE INDEX events_tailnet_time ON events (tailnet_id, time);
CREATE INDEX events_node_revision ON events (node_id, revision);
CREATE INDEX events_time ON events (time);
