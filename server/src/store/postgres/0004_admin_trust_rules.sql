-- Keyless orchestration: OIDC tokens (a CI job's) that are admin credentials with a role and a scope.
CREATE TABLE admin_trust_rules (
    id uuid PRIMARY KEY,
    issuer text NOT NULL,
    record jsonb NOT NULL
);
