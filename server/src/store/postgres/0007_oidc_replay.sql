-- OIDC token ids (jti) already used for admission, until their tokens expire: a token replayed against any
-- replica is refused. The key is SHA-256 of the issuer and the jti, so no token id is stored in the clear.
CREATE TABLE oidc_token_uses (
    key_hash bytea PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX oidc_token_uses_expiry ON oidc_token_uses (expires_at);
