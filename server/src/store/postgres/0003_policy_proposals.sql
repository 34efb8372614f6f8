-- Policy documents waiting for a second principal's approval, and how each was decided.
CREATE TABLE policy_proposals (
    id uuid PRIMARY KEY,
    tailnet_id uuid NOT NULL REFERENCES tailnets (id) ON DELETE CASCADE,
    state text NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX policy_proposals_tailnet ON policy_proposals (tailnet_id, id);
CREATE INDEX policy_proposals_pending ON policy_proposals (state) WHERE state = 'pending';
