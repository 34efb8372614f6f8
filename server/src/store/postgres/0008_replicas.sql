-- Several replicas over one database.

-- Netmap changes by revision (audit events are in `events`), so every replica publishes every change
-- to its watchers in revision order. Kept for a while, then pruned; a replica that falls further behind
-- resends full maps.
CREATE TABLE changes (
    revision bigint PRIMARY KEY,
    tailnet_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    record jsonb NOT NULL
);
CREATE INDEX changes_created ON changes (created_at);

-- The replicas, with their heartbeats (database time).
CREATE TABLE replicas (
    id uuid PRIMARY KEY,
    advertise text NOT NULL,
    stun_address text NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    stopped_at timestamptz
);

-- Which replica runs each tailnet's gateway. A lease holds while its replica heartbeats (one row renews
-- all of a replica's leases); another replica takes it when that one stops or its heartbeat is stale.
CREATE TABLE gateway_leases (
    tailnet_id uuid PRIMARY KEY REFERENCES tailnets (id) ON DELETE CASCADE,
    replica_id uuid NOT NULL
);
CREATE INDEX gateway_leases_replica ON gateway_leases (replica_id);

-- Which replica holds each node's relay stream (the gateways' included).
CREATE TABLE relay_homes (
    tailnet_id uuid NOT NULL,
    public_key bytea NOT NULL,
    replica_id uuid NOT NULL,
    PRIMARY KEY (tailnet_id, public_key)
);

-- Which replica holds each node's netmap stream.
CREATE TABLE presence (
    node_id uuid PRIMARY KEY,
    replica_id uuid NOT NULL,
    since timestamptz NOT NULL
);
CREATE INDEX presence_replica ON presence (replica_id);

-- The secret replicas present to each other (mesh relay), made by the first one.
CREATE TABLE cluster (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    mesh_secret text NOT NULL
);
