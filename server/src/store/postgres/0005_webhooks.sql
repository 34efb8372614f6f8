-- Webhooks (the secret stays in the record, write-only through the API) and their deliveries. The events
-- table is the outbox: a webhook's cursor moves past an event once it was delivered or given up on.
CREATE TABLE webhooks (
    id uuid PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE webhook_deliveries (
    webhook_id uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    revision bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (webhook_id, revision)
);
