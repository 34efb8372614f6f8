//! Conversions between protobuf messages and domain records. Requests are validated here, so every
//! handler works on checked values; each failure names the request field.

use std::collections::BTreeMap;
use std::time::SystemTime;

use cordon_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::{
    AdminToken, AdminTokenSpec, AuthKey, AuthKeySpec, EndReason, Event, EventKind, Ipv6Map, Node, Presented,
    RegisterInput, Role, RunIdentity, Tailnet, TailnetId, TailnetSpec, TrustRule, TrustRuleSpec, UpstreamKind,
    UpstreamSpec,
};
use crate::secret::AUTH_KEY_PREFIX;
use crate::time::to_timestamp;
use crate::validate::{self, quote};

pub fn tailnet_spec(req: pb::CreateTailnetRequest) -> Result<TailnetSpec> {
    validate::dns_label("name", &req.name)?;
    validate::owner("owner", &req.owner)?;
    validate::ttl("ttl_seconds", req.ttl_seconds)?;
    let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
    validate::labels("labels", &labels)?;
    let cidr = validate::cidr("cidr", &req.cidr)?;
    let policy = if req.policy_json.trim().is_empty() {
        None
    } else {
        let policy = crate::control_plane::parse_policy(&req.policy_json)?;
        Some((req.policy_json, std::sync::Arc::new(policy)))
    };
    if req.upstreams.len() > 16 {
        return Err(Error::invalid("upstreams", "at most 16"));
    }
    let mut upstreams: Vec<UpstreamSpec> = Vec::new();
    for (i, u) in req.upstreams.into_iter().enumerate() {
        let spec = upstream_spec(&format!("upstreams[{i}]."), u.name, u.kind, u.base_url, u.api_key)?;
        if upstreams.iter().any(|o| o.name == spec.name) {
            return Err(Error::invalid(format!("upstreams[{i}].name"), format!("{:?} is given twice", spec.name)));
        }
        upstreams.push(spec);
    }
    Ok(TailnetSpec {
        name: req.name,
        owner: req.owner,
        ttl_seconds: req.ttl_seconds,
        labels,
        cidr,
        policy,
        upstreams,
        approval_required: req.require_policy_approval,
    })
}

/// Validates an upstream; `prefix` is put before field names (`upstreams[0].`).
pub fn upstream_spec(
    prefix: &str,
    name: String,
    kind: String,
    base_url: String,
    api_key: String,
) -> Result<UpstreamSpec> {
    validate::dns_label(&format!("{prefix}name"), &name)?;
    validate::no_control(&format!("{prefix}base_url"), &base_url)?;
    let Some(kind) = UpstreamKind::parse(&kind) else {
        let kinds: Vec<&str> = UpstreamKind::ALL.iter().map(|k| k.as_str()).collect();
        return Err(Error::invalid(
            format!("{prefix}kind"),
            format!("{kind} is not one of {}", kinds.join(", "), kind = quote(&kind)),
        ));
    };
    let rest = base_url.strip_prefix("https://").or_else(|| base_url.strip_prefix("http://"));
    if rest.is_none_or(|r| r.is_empty() || r.starts_with('/'))
        || base_url.len() > 512
        || base_url.contains(char::is_whitespace)
    {
        return Err(Error::invalid(
            format!("{prefix}base_url"),
            format!("{base_url} is not an http(s) URL like https://api.openai.com/v1", base_url = quote(base_url)),
        ));
    }
    // The key is checked but never quoted back.
    if api_key.is_empty() {
        return Err(Error::invalid(format!("{prefix}api_key"), "is required (it is stored write-only)"));
    }
    if api_key.len() > 4096 || api_key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(format!("{prefix}api_key"), "must be at most 4096 characters without spaces"));
    }
    Ok(UpstreamSpec {
        name,
        kind,
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key: crate::secret::Secret::from_string(api_key),
    })
}

pub fn upstream(u: &crate::model::UpstreamInfo) -> pb::UpstreamInfo {
    pb::UpstreamInfo {
        name: u.name.clone(),
        kind: u.kind.as_str().into(),
        base_url: u.base_url.clone(),
        api_key_set: true,
        updated_at: ts(u.updated_at),
    }
}

pub fn auth_key_spec(req: pb::CreateAuthKeyRequest) -> Result<AuthKeySpec> {
    let tailnet_id = TailnetId::parse("tailnet_id", &req.tailnet_id)?;
    let tags = validate::tags("tags", &req.tags)?;
    if !req.reusable && req.max_uses > 1 {
        return Err(Error::invalid(
            "max_uses",
            format!("a single-use key (reusable=false) admits one node; set reusable=true for {}", req.max_uses),
        ));
    }
    validate::reason("reason", &req.reason)?;
    let owner = if req.owner.is_empty() {
        None
    } else {
        validate::owner("owner", &req.owner)?;
        Some(req.owner)
    };
    Ok(AuthKeySpec {
        tailnet_id,
        tags,
        reusable: req.reusable,
        ephemeral: req.ephemeral,
        expires_in_seconds: req.expires_in_seconds,
        max_uses: req.max_uses,
        reason: req.reason,
        owner,
    })
}

pub fn registration(req: pb::RegisterRequest) -> Result<RegisterInput> {
    let presented = match req.credential {
        Some(pb::register_request::Credential::AuthKey(auth_key)) => {
            if !auth_key.starts_with(AUTH_KEY_PREFIX) {
                // Say nothing of the value: it may be some other secret pasted by mistake.
                return Err(Error::invalid(
                    "auth_key",
                    format!("is not a Cordon auth key (they start with {AUTH_KEY_PREFIX})"),
                ));
            }
            Presented::AuthKey(crate::secret::hash(&auth_key))
        }
        Some(pb::register_request::Credential::OidcToken(token)) => {
            if token.len() > 16 * 1024 {
                return Err(Error::invalid("oidc_token", "is longer than 16 KiB"));
            }
            let tailnet =
                if req.tailnet_id.is_empty() { None } else { Some(TailnetId::parse("tailnet_id", &req.tailnet_id)?) };
            Presented::OidcToken { token: crate::secret::Secret::from_string(token), tailnet }
        }
        None => return Err(Error::invalid("credential", "is required: set auth_key or oidc_token")),
    };
    Ok(RegisterInput {
        presented,
        wireguard_public_key: validate::wireguard_key("wireguard_public_key", &req.wireguard_public_key)?,
        hostname: validate::hostname("hostname", &req.hostname)?,
        requested_tags: validate::tags("requested_tags", &req.requested_tags)?,
        endpoints: validate::endpoints("endpoints", &req.endpoints)?,
    })
}

/// https URLs, or http for an issuer on this machine (tests, development).
fn issuer_url(field: &str, s: &str) -> Result<()> {
    validate::no_control(field, s)?;
    let bad = || Error::invalid(field, format!("{s} is not an https:// issuer URL", s = quote(s)));
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).ok_or_else(bad)?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || s.len() > 512 || s.contains(char::is_whitespace) {
        return Err(bad());
    }
    let hostname = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let loopback = hostname == "localhost" || hostname.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if s.starts_with("http://") && !loopback {
        return Err(Error::invalid(
            field,
            format!("{s}: plain http is only accepted for loopback issuers; use https", s = quote(s)),
        ));
    }
    Ok(())
}

/// The issuer, audience and claim conditions of a trust rule (for nodes or admins).
fn oidc_expectation(
    issuer: &str,
    audience: &str,
    conditions: &std::collections::HashMap<String, String>,
) -> Result<()> {
    issuer_url("issuer", issuer)?;
    if audience.is_empty() || audience.len() > 256 {
        return Err(Error::invalid("audience", "is required, at most 256 characters"));
    }
    validate::no_control("audience", audience)?;
    claim_conditions(conditions)
}

fn claim_conditions(conditions: &std::collections::HashMap<String, String>) -> Result<()> {
    if conditions.len() > 16 {
        return Err(Error::invalid("claim_conditions", "at most 16 conditions"));
    }
    for (claim, pattern) in conditions {
        let field = format!("claim_conditions[{}]", quote(claim));
        if claim.is_empty() || claim.len() > 64 || !claim.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::invalid(field, "a claim name is 1-64 of letters, digits and '_'"));
        }
        if pattern.is_empty() || pattern.len() > 256 {
            return Err(Error::invalid(field, "a pattern is 1-256 characters ('*' matches any run)"));
        }
        validate::no_control(&field, pattern)?;
    }
    if conditions.is_empty() {
        return Err(Error::invalid(
            "claim_conditions",
            "name at least one condition (e.g. repository): without one, every token of the issuer would be admitted",
        ));
    }
    Ok(())
}

pub fn admin_trust_rule_spec(
    req: pb::CreateAdminTrustRuleRequest,
    by: &crate::model::Actor,
    now: SystemTime,
) -> Result<crate::model::AdminTrustRule> {
    validate::dns_label("name", &req.name)?;
    oidc_expectation(&req.issuer, &req.audience, &req.claim_conditions)?;
    let role = role_of(req.role)?;
    let owner_scope = owner_scope(req.owner_scope)?;
    validate::reason("reason", &req.reason)?;
    Ok(crate::model::AdminTrustRule {
        id: crate::model::AdminTrustRuleId::generate(),
        name: req.name,
        issuer: req.issuer.trim_end_matches('/').to_string(),
        audience: req.audience,
        conditions: req.claim_conditions.into_iter().collect(),
        role,
        owner_scope,
        reason: req.reason,
        created_by: by.0.clone(),
        created_at: now,
    })
}

pub fn admin_trust_rule(r: &crate::model::AdminTrustRule) -> pb::AdminTrustRule {
    pb::AdminTrustRule {
        id: r.id.to_string(),
        name: r.name.clone(),
        issuer: r.issuer.clone(),
        audience: r.audience.clone(),
        claim_conditions: r.conditions.clone().into_iter().collect(),
        role: role(r.role).into(),
        owner_scope: r.owner_scope.clone().unwrap_or_default(),
        reason: r.reason.clone(),
        created_by: r.created_by.clone(),
        created_at: ts(r.created_at),
    }
}

pub fn trust_rule_spec(req: pb::CreateTrustRuleRequest) -> Result<TrustRuleSpec> {
    let tailnet_id = TailnetId::parse("tailnet_id", &req.tailnet_id)?;
    oidc_expectation(&req.issuer, &req.audience, &req.claim_conditions)?;
    let tags = validate::tags("tags", &req.tags)?;
    let lifetime = match req.max_node_lifetime_seconds {
        0 => 3600,
        s if (60..=validate::TTL_MAX).contains(&s) => s,
        s => {
            return Err(Error::invalid("max_node_lifetime_seconds", format!("{s} is out of range; use 60 to 2592000")));
        }
    };
    validate::reason("reason", &req.reason)?;
    if !req.owner_claim.is_empty()
        && (req.owner_claim.len() > 64 || !req.owner_claim.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(Error::invalid("owner_claim", "a claim name is 1-64 of letters, digits and '_'"));
    }
    Ok(TrustRuleSpec {
        tailnet_id,
        issuer: req.issuer.trim_end_matches('/').to_string(),
        audience: req.audience,
        conditions: req.claim_conditions.into_iter().collect(),
        tags,
        max_node_lifetime_seconds: lifetime,
        ephemeral: req.ephemeral,
        reason: req.reason,
        owner_claim: req.owner_claim,
    })
}

/// The longest an admin token may live: ten years.
const MAX_TOKEN_SECONDS: u64 = 10 * 365 * 24 * 3600;

pub fn admin_token_spec(req: pb::CreateAdminTokenRequest) -> Result<AdminTokenSpec> {
    validate::dns_label("name", &req.name)?;
    let role = role_of(req.role)?;
    let owner_scope = owner_scope(req.owner_scope)?;
    if req.expires_in_seconds > MAX_TOKEN_SECONDS {
        return Err(Error::invalid(
            "expires_in_seconds",
            format!("at most {MAX_TOKEN_SECONDS} (ten years); 0 = no expiry"),
        ));
    }
    validate::reason("reason", &req.reason)?;
    Ok(AdminTokenSpec {
        name: req.name,
        role,
        owner_scope,
        expires_in_seconds: req.expires_in_seconds,
        reason: req.reason,
    })
}

/// An optional owner scope: empty is none.
fn owner_scope(scope: String) -> Result<Option<String>> {
    if scope.is_empty() {
        return Ok(None);
    }
    validate::owner("owner_scope", &scope)?;
    Ok(Some(scope))
}

fn role_of(role: i32) -> Result<Role> {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Operator) => Ok(Role::Operator),
        Ok(pb::Role::Auditor) => Ok(Role::Auditor),
        Ok(pb::Role::Approver) => Ok(Role::Approver),
        _ => Err(Error::invalid("role", "is required: ROLE_ADMIN, ROLE_OPERATOR, ROLE_AUDITOR or ROLE_APPROVER")),
    }
}

pub fn role(r: Role) -> pb::Role {
    match r {
        Role::Admin => pb::Role::Admin,
        Role::Operator => pb::Role::Operator,
        Role::Auditor => pb::Role::Auditor,
        Role::Approver => pb::Role::Approver,
    }
}

pub fn admin_token(t: &AdminToken) -> pb::AdminToken {
    pb::AdminToken {
        id: t.id.to_string(),
        name: t.name.clone(),
        role: role(t.role).into(),
        owner_scope: t.owner_scope.clone().unwrap_or_default(),
        created_by: t.created_by.clone(),
        reason: t.reason.clone(),
        created_at: ts(t.created_at),
        expires_at: t.expires_at.map(to_timestamp),
        revoked_at: t.revoked_at.map(to_timestamp),
    }
}

pub fn trust_rule(r: &TrustRule) -> pb::TrustRule {
    pb::TrustRule {
        id: r.id.to_string(),
        tailnet_id: r.spec.tailnet_id.to_string(),
        issuer: r.spec.issuer.clone(),
        audience: r.spec.audience.clone(),
        claim_conditions: r.spec.conditions.clone().into_iter().collect(),
        tags: r.spec.tags.clone(),
        max_node_lifetime_seconds: r.spec.max_node_lifetime_seconds,
        ephemeral: r.spec.ephemeral,
        reason: r.spec.reason.clone(),
        created_by: r.created_by.clone(),
        created_at: ts(r.created_at),
        owner_claim: r.spec.owner_claim.clone(),
    }
}

fn run_identity(r: &RunIdentity) -> pb::RunIdentity {
    pb::RunIdentity {
        issuer: r.issuer.clone(),
        subject: r.subject.clone(),
        claims: r.claims.clone().into_iter().collect(),
    }
}

fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(to_timestamp(t))
}

pub fn tailnet(t: &Tailnet) -> pb::Tailnet {
    pb::Tailnet {
        id: t.id.to_string(),
        name: t.name.clone(),
        owner: t.owner.clone(),
        labels: t.labels.clone().into_iter().collect(),
        cidr: t.cidr.to_string(),
        cidr6: cidr6(t),
        gateway_address: t.cidr.gateway().to_string(),
        created_at: ts(t.created_at),
        expires_at: t.expires_at.map(to_timestamp),
        ttl_seconds: t.ttl_seconds,
        created_by: t.created_by.clone(),
        node_count: t.node_count,
        policy_version: t.policy_version,
        upstreams: t.upstreams.iter().map(upstream).collect(),
        require_policy_approval: t.approval_required,
    }
}

/// The tailnet's IPv6 range, `address/prefix`.
pub fn cidr6(t: &Tailnet) -> String {
    let (network, prefix) = Ipv6Map::of(t.id).network((t.cidr.network, t.cidr.prefix));
    format!("{network}/{prefix}")
}

pub fn node(n: &Node, hub: &Hub) -> pb::NodeInfo {
    let (online, last_seen) = hub.presence(n.id);
    pb::NodeInfo {
        id: n.id.to_string(),
        tailnet_id: n.tailnet_id.to_string(),
        hostname: n.hostname.clone(),
        wireguard_public_key: n.wireguard_public_key.to_vec(),
        addresses: vec![n.address.to_string(), Ipv6Map::of(n.tailnet_id).address(n.address).to_string()],
        tags: n.tags.clone(),
        owner: n.owner.clone(),
        admission: Some(pb::Admission {
            auth_key_id: n.auth_key_id.map(|k| k.to_string()).unwrap_or_default(),
            trust_rule_id: n.trust_rule_id.map(|r| r.to_string()).unwrap_or_default(),
            run: n.identity.as_ref().map(run_identity),
        }),
        ephemeral: n.ephemeral,
        created_at: ts(n.created_at),
        last_seen: last_seen.map(to_timestamp),
        expires_at: ts(n.expires_at),
        online,
        endpoints: n.endpoints.iter().map(|e| e.to_string()).collect(),
        user: n.user.as_ref().map(node_user),
    }
}

fn node_user(u: &crate::model::NodeUser) -> pb::NodeUser {
    pb::NodeUser {
        id: u.id.to_string(),
        email: u.email.clone(),
        display_name: u.display_name.clone(),
        groups: u.groups.clone(),
        login_expires_at: ts(u.login_expires_at),
    }
}

/// A login provider from a request; the client secret is kept, never shown again.
pub fn login_provider_spec(
    req: pb::CreateLoginProviderRequest,
    by: &crate::model::Actor,
    now: SystemTime,
) -> Result<crate::model::LoginProvider> {
    validate::dns_label("name", &req.name)?;
    let tailnet_id =
        if req.tailnet_id.is_empty() { None } else { Some(TailnetId::parse("tailnet_id", &req.tailnet_id)?) };
    issuer_url("issuer", &req.issuer)?;
    if req.client_id.is_empty() || req.client_id.len() > 256 {
        return Err(Error::invalid("client_id", "is required, at most 256 characters"));
    }
    validate::no_control("client_id", &req.client_id)?;
    if req.client_secret.len() > 1024 || req.client_secret.contains(char::is_control) {
        // Never quote a secret.
        return Err(Error::invalid("client_secret", "must be at most 1024 characters without control characters"));
    }
    let scopes = if req.scopes.is_empty() {
        crate::model::DEFAULT_LOGIN_SCOPES.iter().map(|s| s.to_string()).collect()
    } else {
        req.scopes
    };
    list_of("scopes", &scopes, 16, |s| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_graphic()))?;
    let groups_claim = if req.groups_claim.is_empty() { "groups".to_string() } else { req.groups_claim };
    if groups_claim.len() > 64 || !groups_claim.chars().all(|c| c.is_ascii_alphanumeric() || "_-:/.".contains(c)) {
        return Err(Error::invalid(
            "groups_claim",
            format!("{} is not a claim name (letters, digits, _-:/.)", quote(&groups_claim)),
        ));
    }
    let domains: Vec<String> = req.allowed_email_domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    list_of("allowed_email_domains", &domains, 64, |d| {
        d.contains('.') && d.len() <= 253 && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    })?;
    list_of("allowed_groups", &req.allowed_groups, 64, |g| {
        !g.is_empty() && g.len() <= 256 && !g.contains(char::is_control)
    })?;
    let lifetime = match req.login_lifetime_seconds {
        0 => crate::model::DEFAULT_LOGIN_LIFETIME_SECONDS,
        s if (10..=365 * 86_400).contains(&s) => s,
        s => return Err(Error::invalid("login_lifetime_seconds", format!("{s} is outside 10..=31536000 (365 days)"))),
    };
    validate::reason("reason", &req.reason)?;
    Ok(crate::model::LoginProvider {
        id: crate::model::LoginProviderId::generate(),
        name: req.name,
        tailnet_id,
        issuer: req.issuer.trim_end_matches('/').to_string(),
        client_id: req.client_id,
        client_secret: (!req.client_secret.is_empty()).then(|| crate::secret::Secret::from_string(req.client_secret)),
        scopes,
        groups_claim,
        allowed_email_domains: domains,
        allowed_groups: req.allowed_groups,
        login_lifetime_seconds: lifetime,
        reason: req.reason,
        created_by: by.0.clone(),
        created_at: now,
    })
}

/// Checks each item of a list field, naming the first bad one.
fn list_of(field: &str, items: &[String], max: usize, ok: impl Fn(&str) -> bool) -> Result<()> {
    if items.len() > max {
        return Err(Error::invalid(field, format!("at most {max} entries")));
    }
    match items.iter().position(|i| !ok(i)) {
        Some(i) => Err(Error::invalid(format!("{field}[{i}]"), format!("{} is not valid here", quote(&items[i])))),
        None => Ok(()),
    }
}

pub fn login_provider(p: &crate::model::LoginProvider) -> pb::LoginProvider {
    pb::LoginProvider {
        id: p.id.to_string(),
        name: p.name.clone(),
        tailnet_id: p.tailnet_id.map(|t| t.to_string()).unwrap_or_default(),
        issuer: p.issuer.clone(),
        client_id: p.client_id.clone(),
        has_client_secret: p.client_secret.is_some(),
        scopes: p.scopes.clone(),
        groups_claim: p.groups_claim.clone(),
        allowed_email_domains: p.allowed_email_domains.clone(),
        allowed_groups: p.allowed_groups.clone(),
        login_lifetime_seconds: p.login_lifetime_seconds,
        reason: p.reason.clone(),
        created_by: p.created_by.clone(),
        created_at: ts(p.created_at),
    }
}

pub fn user(u: &crate::model::User, nodes: &[Node], hub: &Hub) -> pb::User {
    pb::User {
        id: u.id.to_string(),
        issuer: u.issuer.clone(),
        subject: u.subject.clone(),
        email: u.email.clone(),
        display_name: u.display_name.clone(),
        groups: u.groups.clone(),
        last_login: ts(u.last_login),
        created_at: ts(u.created_at),
        login_provider_id: u.login_provider_id.to_string(),
        nodes: nodes.iter().map(|n| node(n, hub)).collect(),
    }
}

/// A login request after validation.
pub fn login_request(req: pb::StartLoginRequest) -> Result<crate::login::LoginRequest> {
    Ok(crate::login::LoginRequest {
        tailnet: TailnetId::parse("tailnet_id", &req.tailnet_id)?,
        wireguard_public_key: validate::wireguard_key("wireguard_public_key", &req.wireguard_public_key)?,
        hostname: validate::hostname("hostname", &req.hostname)?,
        requested_tags: validate::tags("requested_tags", &req.requested_tags)?,
        endpoints: validate::endpoints("endpoints", &req.endpoints)?,
    })
}

pub fn auth_key(k: &AuthKey, now: SystemTime) -> pb::AuthKey {
    pb::AuthKey {
        id: k.id.to_string(),
        tailnet_id: k.tailnet_id.to_string(),
        tags: k.tags.clone(),
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        max_uses: k.max_uses,
        uses: k.uses,
        created_at: ts(k.created_at),
        expires_at: ts(k.expires_at),
        revoked_at: k.revoked_at.map(to_timestamp),
        reason: k.reason.clone(),
        created_by: k.created_by.clone(),
        owner: k.owner.clone(),
        state: k.state(now).as_str().to_string(),
    }
}

fn event_kind(kind: EventKind) -> pb::EventKind {
    match kind {
        EventKind::TailnetCreated => pb::EventKind::TailnetCreated,
        EventKind::TailnetDeleted => pb::EventKind::TailnetDeleted,
        EventKind::TailnetExpired => pb::EventKind::TailnetExpired,
        EventKind::KeyCreated => pb::EventKind::KeyCreated,
        EventKind::KeyRevoked => pb::EventKind::KeyRevoked,
        EventKind::NodeJoined => pb::EventKind::NodeJoined,
        EventKind::NodeLeft => pb::EventKind::NodeLeft,
        EventKind::PolicyChanged => pb::EventKind::PolicyChanged,
        EventKind::TrustRuleCreated => pb::EventKind::TrustRuleCreated,
        EventKind::TrustRuleDeleted => pb::EventKind::TrustRuleDeleted,
        EventKind::UpstreamSet => pb::EventKind::UpstreamSet,
        EventKind::GatewayRequest => pb::EventKind::GatewayRequest,
        EventKind::GatewayBlocked => pb::EventKind::GatewayBlocked,
        EventKind::AdminTokenCreated => pb::EventKind::AdminTokenCreated,
        EventKind::AdminTokenRevoked => pb::EventKind::AdminTokenRevoked,
        EventKind::PolicyProposed => pb::EventKind::PolicyProposed,
        EventKind::PolicyApproved => pb::EventKind::PolicyApproved,
        EventKind::PolicyRejected => pb::EventKind::PolicyRejected,
        EventKind::PolicyProposalExpired => pb::EventKind::PolicyProposalExpired,
        EventKind::PolicyApprovalSet => pb::EventKind::PolicyApprovalSet,
        EventKind::AdminTrustRuleCreated => pb::EventKind::AdminTrustRuleCreated,
        EventKind::AdminTrustRuleDeleted => pb::EventKind::AdminTrustRuleDeleted,
        EventKind::WebhookCreated => pb::EventKind::WebhookCreated,
        EventKind::WebhookDeleted => pb::EventKind::WebhookDeleted,
        EventKind::LoginProviderCreated => pb::EventKind::LoginProviderCreated,
        EventKind::LoginProviderDeleted => pb::EventKind::LoginProviderDeleted,
        EventKind::UserLoggedIn => pb::EventKind::UserLoggedIn,
        EventKind::LoginRefused => pb::EventKind::LoginRefused,
        EventKind::LoginExpired => pb::EventKind::LoginExpired,
        EventKind::UserDeleted => pb::EventKind::UserDeleted,
    }
}

pub fn event(e: &Event) -> pb::Event {
    pb::Event {
        id: e.id.to_string(),
        revision: e.revision,
        time: ts(e.time),
        kind: event_kind(e.kind).into(),
        tailnet_id: e.tailnet_id.map(|t| t.to_string()).unwrap_or_default(),
        node_id: e.node_id.map(|n| n.to_string()).unwrap_or_default(),
        auth_key_id: e.auth_key_id.map(|k| k.to_string()).unwrap_or_default(),
        actor: e.actor.clone(),
        reason: e.reason.clone(),
        summary: e.summary.clone(),
        run: e.run.as_ref().map(run_identity),
        gateway: e.gateway.as_deref().map(gateway_request),
        user: e.user.as_ref().map(node_user),
    }
}

fn gateway_request(g: &crate::model::GatewayRequest) -> pb::GatewayRequest {
    pb::GatewayRequest {
        request_id: g.request_id.clone(),
        api: g.api.clone(),
        model: g.model.clone(),
        upstream: g.upstream.clone(),
        upstream_model: g.upstream_model.clone(),
        status: u32::from(g.status),
        decision: g.decision.as_str().into(),
        rule: g.rule.clone(),
        message: g.message.clone(),
        stream: g.stream,
        input_tokens: g.input_tokens,
        output_tokens: g.output_tokens,
        cached_tokens: g.cached_tokens,
        tool_calls: g
            .tool_calls
            .iter()
            .map(|t| pb::ToolCall { name: t.name.clone(), arguments: t.arguments.clone(), blocked: t.blocked })
            .collect(),
        latency_us: g.latency_us,
        ttfb_us: g.ttfb_us,
        hostname: g.hostname.clone(),
        tags: g.tags.clone(),
        owner: g.owner.clone(),
        request_body: g.request_body.clone().unwrap_or_default(),
        response_body: g.response_body.clone().unwrap_or_default(),
        charged_tokens: g.charged_tokens,
    }
}

pub fn policy_version(p: &crate::model::PolicyRecord) -> pb::PolicyVersion {
    pb::PolicyVersion {
        tailnet_id: p.tailnet_id.to_string(),
        version: p.version,
        policy_json: p.text.clone(),
        author: p.author.clone(),
        reason: p.reason.clone(),
        created_at: ts(p.created_at),
        summary: p.summary.clone(),
        proposal: None,
    }
}

pub fn proposal(p: &crate::model::PolicyProposal) -> pb::PolicyProposal {
    use crate::model::ProposalState;
    pb::PolicyProposal {
        id: p.id.to_string(),
        tailnet_id: p.tailnet_id.to_string(),
        policy_json: p.text.clone(),
        author: p.author.clone(),
        proposed_by: p.proposed_by.clone(),
        reason: p.reason.clone(),
        created_at: ts(p.created_at),
        expires_at: ts(p.expires_at),
        base_version: p.base_version,
        summary: p.summary.clone(),
        state: match p.state {
            ProposalState::Pending => pb::ProposalState::Pending,
            ProposalState::Approved => pb::ProposalState::Approved,
            ProposalState::Rejected => pb::ProposalState::Rejected,
            ProposalState::Expired => pb::ProposalState::Expired,
        }
        .into(),
        decided_by: p.decided_by.clone().unwrap_or_default(),
        decided_at: p.decided_at.map(to_timestamp),
        decision_reason: p.decision_reason.clone(),
        version: p.version,
    }
}

/// A webhook from a request, checked: URL (no link-local targets), events, secret, retry window.
pub fn webhook(
    req: pb::CreateWebhookRequest,
    owner_scope: Option<String>,
    by: &crate::model::Actor,
    now: SystemTime,
) -> Result<crate::model::Webhook> {
    let tailnet_id =
        if req.tailnet_id.is_empty() { None } else { Some(TailnetId::parse("tailnet_id", &req.tailnet_id)?) };
    if req.url.len() > 2048 {
        return Err(Error::invalid("url", "at most 2048 characters"));
    }
    validate::no_control("url", &req.url)?;
    crate::webhook::check_url(&req.url)?;
    let mut events = Vec::new();
    for (i, name) in req.events.iter().enumerate() {
        let kind = EventKind::parse(name).ok_or_else(|| {
            Error::invalid(
                format!("events[{i}]"),
                format!("{} is not an event name (e.g. gateway_blocked, node_joined)", quote(name)),
            )
        })?;
        events.push(kind);
    }
    if req.secret.len() < 16 || req.secret.len() > 256 {
        return Err(Error::invalid("secret", "is required: 16 to 256 characters (the HMAC key receivers verify with)"));
    }
    let retry_seconds = match req.retry_seconds {
        0 => 600,
        s if s <= 86_400 => s,
        s => return Err(Error::invalid("retry_seconds", format!("{s} is more than 86400 (a day)"))),
    };
    validate::reason("reason", &req.reason)?;
    Ok(crate::model::Webhook {
        id: crate::model::WebhookId::generate(),
        tailnet_id,
        owner_scope,
        url: req.url,
        events,
        secret: req.secret,
        retry_seconds,
        reason: req.reason,
        created_by: by.0.clone(),
        created_at: now,
        delivered_revision: 0,
    })
}

pub fn webhook_message(w: &crate::model::Webhook) -> pb::Webhook {
    pb::Webhook {
        id: w.id.to_string(),
        tailnet_id: w.tailnet_id.map(|t| t.to_string()).unwrap_or_default(),
        url: w.url.clone(),
        events: w.events.iter().map(|k| k.name()).collect(),
        retry_seconds: w.retry_seconds,
        reason: w.reason.clone(),
        created_by: w.created_by.clone(),
        created_at: ts(w.created_at),
        delivered_revision: w.delivered_revision,
    }
}

pub fn delivery(d: &crate::model::Delivery) -> pb::WebhookDelivery {
    pb::WebhookDelivery {
        event_id: d.event_id.to_string(),
        revision: d.revision,
        event: d.kind.name(),
        delivered: d.delivered,
        attempts: d.attempts,
        status: d.status.into(),
        error: d.error.clone(),
        time: ts(d.time),
    }
}

pub fn access_report(r: &crate::access::AccessReport) -> pb::AccessReport {
    pb::AccessReport {
        tailnet_id: r.tailnet_id.to_string(),
        tailnet_name: r.tailnet_name.clone(),
        owner: r.owner.clone(),
        generated_at: ts(r.generated_at),
        policy_version: r.policy_version,
        policy_author: r.policy_author.clone(),
        policy_reason: r.policy_reason.clone(),
        policy_set_at: r.policy_set_at.map(to_timestamp),
        policy_approved_by: r.policy_approved_by.clone(),
        nodes: r
            .nodes
            .iter()
            .map(|n| pb::NodeAccess {
                node_id: n.node.id.to_string(),
                hostname: n.node.hostname.clone(),
                tags: n.node.tags.clone(),
                owner: n.node.owner.clone(),
                admitted_by: n.admitted_by.clone(),
                admission_created_by: n.admission_created_by.clone(),
                admission_reason: n.admission_reason.clone(),
                run_claims: n.run.as_ref().map(|r| r.claims.clone().into_iter().collect()).unwrap_or_default(),
                online: n.online,
                last_seen: n.last_seen.map(to_timestamp),
                reach: n
                    .reach
                    .iter()
                    .map(|r| pb::Reach {
                        peer_id: r.peer_id.clone(),
                        peer_hostname: r.peer_hostname.clone(),
                        ports: r.ports.clone(),
                    })
                    .collect(),
                ai_capabilities_json: serde_json::Value::Array(n.ai.clone()).to_string(),
            })
            .collect(),
        tags: r
            .tags
            .iter()
            .map(|t| pb::TagAccess {
                tag: t.tag.clone(),
                owners: t.owners.clone(),
                nodes: t.nodes.clone(),
                auth_keys: t.auth_keys.clone(),
                trust_rules: t.trust_rules.clone(),
            })
            .collect(),
    }
}

/// A node's packet filter as the netmap carries it: each IPv4 source with the IPv6 network it maps to.
pub fn packet_filter(rules: Option<&[crate::policy::FilterRule]>, ipv6: Ipv6Map) -> pb::PacketFilter {
    use crate::policy::Proto;
    let Some(rules) = rules else { return pb::PacketFilter { allow_all: true, rules: vec![] } };
    let rules = rules
        .iter()
        .map(|r| pb::FilterRule {
            sources: r
                .sources
                .iter()
                .flat_map(|&(a, p)| {
                    let (a6, p6) = ipv6.network((a, p));
                    [format!("{a}/{p}"), format!("{a6}/{p6}")]
                })
                .collect(),
            protocol: match r.ports.proto {
                Proto::Any => "*",
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
                Proto::Icmp => "icmp",
            }
            .into(),
            first_port: r.ports.first.into(),
            last_port: r.ports.last.into(),
        })
        .collect();
    pb::PacketFilter { allow_all: false, rules }
}

pub fn end_reason(r: EndReason) -> pb::stream_ended::Reason {
    use pb::stream_ended::Reason;
    match r {
        EndReason::NodeRemoved => Reason::NodeRemoved,
        EndReason::KeyRevoked => Reason::KeyRevoked,
        EndReason::TailnetDeleted => Reason::TailnetDeleted,
        EndReason::TailnetExpired => Reason::TailnetExpired,
        EndReason::NodeExpired => Reason::NodeExpired,
        EndReason::ServerShutdown => Reason::ServerShutdown,
        EndReason::LoginExpired => Reason::LoginExpired,
        EndReason::UserDeleted => Reason::UserDeleted,
    }
}

/// A page token is the id or revision of the last item of the previous page.
pub fn page_token<T>(field: &str, token: &str, parse: impl FnOnce(&str) -> Option<T>) -> Result<Option<T>> {
    if token.is_empty() {
        return Ok(None);
    }
    parse(token)
        .map(Some)
        .ok_or_else(|| Error::invalid(field, "is not a token this server issued; pass next_page_token unchanged"))
}

pub fn replica(r: &crate::store::postgres::cluster::ReplicaRow) -> pb::Replica {
    pb::Replica {
        id: r.id.to_string(),
        advertise: r.advertise.clone(),
        stun_address: r.stun_address.clone(),
        started_at: Some(to_timestamp(r.started_at)),
        heartbeat_at: Some(to_timestamp(r.heartbeat_at)),
        alive: r.alive,
        gateways: r.gateways,
        answering: r.answering,
        stopped_at: r.stopped_at.map(to_timestamp),
    }
}
