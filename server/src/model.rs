//! Domain records: tailnets, nodes, auth keys and audit events, independent of protobuf.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Error;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered (UUIDv7) id.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// Parses an id given in request field `field`.
            pub fn parse(field: &str, s: &str) -> Result<Self, Error> {
                if s.is_empty() {
                    return Err(Error::invalid(field, "is required"));
                }
                // The value is not repeated: a pasted secret must not come back in an error.
                Uuid::from_str(s).map(Self).map_err(|_| {
                    Error::invalid(field, format!("is not a UUID ({} characters; ids look like 01900000-0000-7000-8000-000000000000)", s.len()))
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// Identifies a tailnet.
    TailnetId
);
id_type!(
    /// Identifies a node.
    NodeId
);
id_type!(
    /// Identifies an auth key (not its secret).
    AuthKeyId
);
id_type!(
    /// Identifies a trust rule.
    TrustRuleId
);
id_type!(
    /// Identifies an admin token (not its secret).
    AdminTokenId
);
id_type!(
    /// Identifies a policy proposal.
    ProposalId
);
id_type!(
    /// Identifies an admin trust rule.
    AdminTrustRuleId
);
id_type!(
    /// Identifies a webhook.
    WebhookId
);
id_type!(
    /// Identifies a login provider.
    LoginProviderId
);
id_type!(
    /// Identifies a person (a user), one per issuer and subject.
    UserId
);

/// The scopes a login asks for when the provider names none.
pub const DEFAULT_LOGIN_SCOPES: [&str; 4] = ["openid", "email", "profile", "groups"];
/// How long a person's login lasts when the provider does not say.
pub const DEFAULT_LOGIN_LIFETIME_SECONDS: u64 = 7 * 86_400;

/// An OIDC identity provider people log in through (device authorization grant, run by the server):
/// one tailnet's, or server-wide (`tailnet_id` `None`) for every tailnet without its own.
#[derive(Clone, Serialize, Deserialize)]
pub struct LoginProvider {
    pub id: LoginProviderId,
    pub name: String,
    pub tailnet_id: Option<TailnetId>,
    pub issuer: String,
    pub client_id: String,
    /// Write-only: used only to call the IdP's endpoints.
    pub client_secret: Option<crate::secret::Secret>,
    pub scopes: Vec<String>,
    pub groups_claim: String,
    pub allowed_email_domains: Vec<String>,
    pub allowed_groups: Vec<String>,
    pub login_lifetime_seconds: u64,
    pub reason: String,
    pub created_by: String,
    pub created_at: SystemTime,
}

impl fmt::Debug for LoginProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginProvider")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("tailnet_id", &self.tailnet_id)
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// A person, as of their last login.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub issuer: String,
    pub subject: String,
    pub email: String,
    pub display_name: String,
    pub groups: Vec<String>,
    pub last_login: SystemTime,
    pub created_at: SystemTime,
    pub login_provider_id: LoginProviderId,
    /// The tailnets the person has logged a node into (where to look for their nodes).
    pub tailnets: Vec<TailnetId>,
}

impl User {
    /// The person as their nodes and events carry them.
    pub fn stamp(&self, login_expires_at: SystemTime) -> NodeUser {
        NodeUser {
            id: self.id,
            email: self.email.clone(),
            display_name: self.display_name.clone(),
            groups: self.groups.clone(),
            login_expires_at,
            logged_out: false,
        }
    }
}

/// The person who logged a node in, as of that login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUser {
    pub id: UserId,
    pub email: String,
    pub display_name: String,
    pub groups: Vec<String>,
    pub login_expires_at: SystemTime,
    /// The login expired: the node keeps its id and address but is not admitted until the person logs
    /// in again.
    #[serde(default)]
    pub logged_out: bool,
}

/// What an admin credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, admin tokens included.
    Admin,
    /// Tailnets, keys, trust rules, nodes, upstreams and policy; not tokens.
    Operator,
    /// Read only: get, list, audit, events.
    Auditor,
    /// Read, and approve policy proposals.
    Approver,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Auditor, Role::Approver];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Approver => "approver",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// Whether the role may do `action`.
    pub fn allows(self, action: Action) -> bool {
        match action {
            Action::Read => true,
            Action::Write => matches!(self, Role::Admin | Role::Operator),
            Action::ManageTokens | Action::Govern => self == Role::Admin,
            Action::Approve => matches!(self, Role::Admin | Role::Approver),
        }
    }
}

/// The kinds of thing an admin call does, as far as roles are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Get, list, audit, events, dry runs.
    Read,
    /// Create, change or delete tailnets and what they hold.
    Write,
    /// Create, list or revoke admin tokens.
    ManageTokens,
    /// Change a tailnet's governance settings (whether policy changes need approval).
    Govern,
    /// Approve or reject a policy proposal.
    Approve,
}

/// An admin credential made through the API (the bootstrap token lives in the data directory).
#[derive(Clone, Serialize, Deserialize)]
pub struct AdminToken {
    pub id: AdminTokenId,
    pub name: String,
    pub role: Role,
    /// Confines the token to the tailnets of this owner.
    pub owner_scope: Option<String>,
    pub secret_hash: SecretHash,
    pub created_by: String,
    pub reason: String,
    pub created_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    pub revoked_at: Option<SystemTime>,
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminToken")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("owner_scope", &self.owner_scope)
            .field("secret_hash", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl AdminToken {
    pub fn live(&self, now: SystemTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// Alerts where operators look: chosen audit events POSTed as JSON to `url`, signed with HMAC-SHA256.
/// The events table is the outbox: the webhook's cursor (`delivered_revision`) moves past an event only
/// once it was delivered or given up on, so a restart loses none.
#[derive(Clone, Serialize, Deserialize)]
pub struct Webhook {
    pub id: WebhookId,
    /// Events of this tailnet only; `None`: of every tailnet (and server-wide ones).
    pub tailnet_id: Option<TailnetId>,
    /// The scope of the credential that made it (scoped credentials see only their own).
    pub owner_scope: Option<String>,
    pub url: String,
    /// Event kinds to deliver; empty: all.
    pub events: Vec<EventKind>,
    /// The HMAC key; write-only, like upstream keys.
    pub secret: String,
    /// How long one event is retried before it is recorded as failed and the next one goes.
    pub retry_seconds: u64,
    pub reason: String,
    pub created_by: String,
    pub created_at: SystemTime,
    /// The last revision delivered or given up on.
    pub delivered_revision: u64,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("tailnet_id", &self.tailnet_id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// One event's delivery to a webhook: delivered, or given up on after its retries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub webhook_id: WebhookId,
    pub event_id: Uuid,
    pub revision: u64,
    pub kind: EventKind,
    pub delivered: bool,
    pub attempts: u32,
    /// The receiver's last HTTP status, 0 when it never answered.
    pub status: u16,
    pub error: String,
    pub time: SystemTime,
}

/// Keyless orchestration: an OIDC ID token from `issuer` for `audience` whose claims meet `conditions`
/// (a CI job's, say) is an admin credential with `role`, confined to `owner_scope`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminTrustRule {
    pub id: AdminTrustRuleId,
    /// Events name a caller it admitted `oidc:<name>:<subject>`.
    pub name: String,
    pub issuer: String,
    pub audience: String,
    pub conditions: BTreeMap<String, String>,
    pub role: Role,
    pub owner_scope: Option<String>,
    pub reason: String,
    pub created_by: String,
    pub created_at: SystemTime,
}

/// What a caller supplies to create an admin token.
#[derive(Clone, Debug)]
pub struct AdminTokenSpec {
    pub name: String,
    pub role: Role,
    pub owner_scope: Option<String>,
    pub expires_in_seconds: u64,
    pub reason: String,
}

/// Who is calling the admin API, and what they may do: the actor that events name, the role, and the
/// owner whose tailnets they are confined to (`None`: every owner).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub actor: Actor,
    pub role: Role,
    pub scope: Option<String>,
}

impl Principal {
    /// Whether the caller sees tailnets of `owner`.
    pub fn sees_owner(&self, owner: &str) -> bool {
        self.scope.as_deref().is_none_or(|s| s == owner)
    }

    /// The names `tagOwners` may use for this caller: `token:<name>` (for an API token) and `role:<role>`.
    pub fn owner_names(&self) -> Vec<String> {
        let mut names = vec![format!("role:{}", self.role.name())];
        if let Some(name) = self.actor.0.strip_prefix("token:") {
            names.push(format!("token:{name}"));
        }
        names
    }
}

/// Who a federated node is: issuer, subject, and the claims of the run that admitted it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub issuer: String,
    pub subject: String,
    pub claims: BTreeMap<String, String>,
}

/// Admits nodes that present an OIDC token from `issuer` for `audience` whose claims meet `conditions`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrustRule {
    pub id: TrustRuleId,
    #[serde(flatten)]
    pub spec: TrustRuleSpec,
    pub created_by: String,
    pub created_at: SystemTime,
}

/// How a registration proves itself.
#[derive(Clone)]
pub enum Credential {
    AuthKey(SecretHash),
    /// A token a trust rule accepted.
    Federated {
        rule: TrustRuleId,
        identity: RunIdentity,
        /// The token's id (SHA-256 of issuer and `jti`) and expiry, when it has one: used once.
        token_use: Option<(SecretHash, SystemTime)>,
    },
}

/// An IPv4 range in CIDR form.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub const DEFAULT: Ipv4Cidr = Ipv4Cidr { network: Ipv4Addr::new(100, 64, 0, 0), prefix: 10 };

    fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// The first usable address: reserved for the tailnet's gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The first address handed to nodes.
    pub fn first_node_address(&self) -> u32 {
        u32::from(self.network) + 2
    }

    /// The last usable address (the broadcast address is not handed out).
    pub fn last_node_address(&self) -> u32 {
        (u64::from(u32::from(self.network)) + self.size() - 2) as u32
    }
}

/// A tailnet's IPv6 addressing: a unique local prefix (RFC 4193: `fd` and a 40-bit global id, here
/// taken from a hash of the tailnet's id, so nothing is stored or allocated) with the IPv4 range mapped
/// into the last 32 bits. A node's IPv6 address follows from its IPv4 one, so the two are unique
/// together, a packet filter for IPv4 sources maps rule by rule, and a node keeps both across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Map {
    prefix: u128,
}

impl Ipv6Map {
    pub fn of(tailnet: TailnetId) -> Ipv6Map {
        use sha2::Digest;
        let digest = sha2::Sha256::new().chain_update(b"cordon ula ").chain_update(tailnet.as_bytes()).finalize();
        let mut prefix = [0u8; 16];
        prefix[0] = 0xfd;
        prefix[1..6].copy_from_slice(&digest[..5]);
        Ipv6Map { prefix: u128::from_be_bytes(prefix) }
    }

    /// The IPv6 address that goes with an IPv4 address of the tailnet.
    pub fn address(&self, v4: Ipv4Addr) -> Ipv6Addr {
        Ipv6Addr::from(self.prefix | u128::from(u32::from(v4)))
    }

    /// An IPv4 network (address, prefix length) as the IPv6 network it maps to.
    pub fn network(&self, (v4, len): (Ipv4Addr, u8)) -> (Ipv6Addr, u8) {
        (self.address(v4), 96 + len.min(32))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl fmt::Debug for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An isolated private network.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tailnet {
    pub id: TailnetId,
    pub name: String,
    pub owner: String,
    pub labels: BTreeMap<String, String>,
    pub cidr: Ipv4Cidr,
    pub created_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    pub ttl_seconds: u64,
    pub created_by: String,
    /// Kept in the record (updated in the same batch as each join and removal) so reads need no scan.
    #[serde(default)]
    pub node_count: u32,
    /// 0 = the default allow-all policy.
    #[serde(default)]
    pub policy_version: u64,
    /// The gateway's upstreams, without their keys (stored apart, write-only).
    #[serde(default)]
    pub upstreams: Vec<UpstreamInfo>,
    /// Policy changes wait for a second principal's approval (see [`PolicyProposal`]).
    #[serde(default)]
    pub approval_required: bool,
}

/// Which API an upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpstreamKind {
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "anthropic")]
    Anthropic,
    /// Any provider with OpenAI's chat and responses APIs (vLLM, Ollama, LiteLLM, ...).
    #[serde(rename = "openai-compatible")]
    OpenAiCompatible,
}

impl UpstreamKind {
    pub const ALL: [UpstreamKind; 3] = [UpstreamKind::OpenAi, UpstreamKind::Anthropic, UpstreamKind::OpenAiCompatible];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::OpenAi => "openai",
            UpstreamKind::Anthropic => "anthropic",
            UpstreamKind::OpenAiCompatible => "openai-compatible",
        }
    }

    pub fn parse(s: &str) -> Option<UpstreamKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for UpstreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An upstream LLM provider as everyone may see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamInfo {
    pub name: String,
    pub kind: UpstreamKind,
    pub base_url: String,
    pub updated_at: SystemTime,
}

/// An upstream with its API key, as a caller sets it. `Debug` never shows the key.
#[derive(Clone)]
pub struct UpstreamSpec {
    pub name: String,
    pub kind: UpstreamKind,
    pub base_url: String,
    pub api_key: crate::secret::Secret,
}

impl fmt::Debug for UpstreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

/// What a caller supplies to create a tailnet; validated by [`crate::validate`].
#[derive(Clone, Debug)]
pub struct TailnetSpec {
    pub name: String,
    pub owner: String,
    pub ttl_seconds: u64,
    pub labels: BTreeMap<String, String>,
    pub cidr: Ipv4Cidr,
    /// The first policy, already validated: its text and the parsed form.
    pub policy: Option<(String, std::sync::Arc<crate::policy::Policy>)>,
    pub upstreams: Vec<UpstreamSpec>,
    pub approval_required: bool,
}

/// One accepted version of a tailnet's policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub tailnet_id: TailnetId,
    pub version: u64,
    pub text: String,
    pub author: String,
    pub reason: String,
    pub created_at: SystemTime,
    pub summary: String,
}

/// Where a policy proposal stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProposalState {
    Pending,
    Approved,
    Rejected,
    Expired,
}

impl ProposalState {
    pub fn name(self) -> &'static str {
        match self {
            ProposalState::Pending => "pending",
            ProposalState::Approved => "approved",
            ProposalState::Rejected => "rejected",
            ProposalState::Expired => "expired",
        }
    }
}

/// A policy document waiting for approval on a tailnet that requires it. Only an approval by another
/// principal makes it the current version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyProposal {
    pub id: ProposalId,
    pub tailnet_id: TailnetId,
    pub text: String,
    /// Who wrote the document (free text), and the credential that proposed it.
    pub author: String,
    pub proposed_by: String,
    pub reason: String,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    /// The version it was validated and diffed against; approval needs that version to be current still.
    pub base_version: u64,
    /// What it changes against the base version.
    pub summary: String,
    pub state: ProposalState,
    pub decided_by: Option<String>,
    pub decided_at: Option<SystemTime>,
    #[serde(default)]
    pub decision_reason: String,
    /// The version approval made.
    #[serde(default)]
    pub version: u64,
}

/// A 32-byte secret hash (auth key secrets and session tokens are stored only as these).
pub type SecretHash = [u8; 32];

/// A machine admitted to a tailnet.
#[derive(Clone, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub tailnet_id: TailnetId,
    pub hostname: String,
    pub wireguard_public_key: [u8; 32],
    pub address: Ipv4Addr,
    pub tags: Vec<String>,
    pub owner: String,
    pub auth_key_id: Option<AuthKeyId>,
    pub ephemeral: bool,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub session_hash: SecretHash,
    #[serde(default)]
    pub endpoints: Vec<std::net::SocketAddr>,
    #[serde(default)]
    pub trust_rule_id: Option<TrustRuleId>,
    #[serde(default)]
    pub identity: Option<RunIdentity>,
    /// The tailnet's gateway, which the server runs itself.
    #[serde(default)]
    pub gateway: bool,
    /// The person who logged the node in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<NodeUser>,
}

/// The hostname and tag of every tailnet's gateway.
pub const GATEWAY_HOSTNAME: &str = "gateway";
pub const GATEWAY_TAG: &str = "tag:gateway";

impl Node {
    /// The node as the policy sees it.
    pub fn subject<'a>(&'a self, id: &'a str) -> crate::policy::Subject<'a> {
        crate::policy::Subject {
            id,
            tags: &self.tags,
            owner: &self.owner,
            gateway: self.gateway,
            groups: self.user.as_ref().map(|u| u.groups.as_slice()),
        }
    }

    /// False for a person's node whose login expired: it keeps its record but is nobody's peer.
    pub fn admitted(&self) -> bool {
        self.user.as_ref().is_none_or(|u| !u.logged_out)
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("tailnet_id", &self.tailnet_id)
            .field("hostname", &self.hostname)
            .field("address", &self.address)
            .field("tags", &self.tags)
            .field("owner", &self.owner)
            .field("ephemeral", &self.ephemeral)
            .field("user", &self.user.as_ref().map(|u| &u.email))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::AuthKey(_) => f.write_str("AuthKey(<redacted>)"),
            Credential::Federated { rule, identity, .. } => {
                f.debug_struct("Federated").field("rule", rule).field("identity", identity).finish()
            }
        }
    }
}

/// A credential as presented, before it is checked.
#[derive(Clone)]
pub enum Presented {
    AuthKey(SecretHash),
    OidcToken { token: crate::secret::Secret, tailnet: Option<TailnetId> },
}

/// A registration request after field validation, before its credential is checked.
#[derive(Clone)]
pub struct RegisterInput {
    pub presented: Presented,
    pub wireguard_public_key: [u8; 32],
    pub hostname: String,
    pub requested_tags: Vec<String>,
    pub endpoints: Vec<std::net::SocketAddr>,
}

/// What a registration asks for, after validation.
#[derive(Clone, Debug)]
pub struct Registration {
    pub credential: Credential,
    pub wireguard_public_key: [u8; 32],
    pub hostname: String,
    pub requested_tags: Vec<String>,
    pub endpoints: Vec<std::net::SocketAddr>,
}

/// Admits nodes to one tailnet. The secret itself is never stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct AuthKey {
    pub id: AuthKeyId,
    pub tailnet_id: TailnetId,
    pub secret_hash: SecretHash,
    pub tags: Vec<String>,
    pub reusable: bool,
    pub ephemeral: bool,
    /// 0 = unlimited.
    pub max_uses: u32,
    pub uses: u32,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub revoked_at: Option<SystemTime>,
    pub reason: String,
    pub created_by: String,
    pub owner: String,
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthKey")
            .field("id", &self.id)
            .field("tailnet_id", &self.tailnet_id)
            .field("tags", &self.tags)
            .field("reusable", &self.reusable)
            .field("uses", &self.uses)
            .field("max_uses", &self.max_uses)
            .finish_non_exhaustive()
    }
}

/// Why an auth key cannot admit a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Valid,
    Expired,
    Revoked,
    Exhausted,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Valid => "valid",
            KeyState::Expired => "expired",
            KeyState::Revoked => "revoked",
            KeyState::Exhausted => "exhausted",
        }
    }
}

impl AuthKey {
    pub fn state(&self, now: SystemTime) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.expires_at <= now {
            KeyState::Expired
        } else if self.max_uses != 0 && self.uses >= self.max_uses {
            KeyState::Exhausted
        } else {
            KeyState::Valid
        }
    }
}

/// What a caller supplies to create a trust rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrustRuleSpec {
    pub tailnet_id: TailnetId,
    pub issuer: String,
    pub audience: String,
    pub conditions: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub max_node_lifetime_seconds: u64,
    pub ephemeral: bool,
    pub reason: String,
    /// The claim whose value owns the nodes the rule admits; empty: the tailnet's owner.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner_claim: String,
}

/// What a caller supplies to create an auth key.
#[derive(Clone, Debug)]
pub struct AuthKeySpec {
    pub tailnet_id: TailnetId,
    pub tags: Vec<String>,
    pub reusable: bool,
    pub ephemeral: bool,
    pub expires_in_seconds: u64,
    pub max_uses: u32,
    pub reason: String,
    pub owner: Option<String>,
}

/// The kinds of audit event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    TailnetCreated,
    TailnetDeleted,
    TailnetExpired,
    KeyCreated,
    KeyRevoked,
    NodeJoined,
    NodeLeft,
    PolicyChanged,
    TrustRuleCreated,
    TrustRuleDeleted,
    UpstreamSet,
    GatewayRequest,
    GatewayBlocked,
    AdminTokenCreated,
    AdminTokenRevoked,
    PolicyProposed,
    PolicyApproved,
    PolicyRejected,
    PolicyProposalExpired,
    PolicyApprovalSet,
    AdminTrustRuleCreated,
    AdminTrustRuleDeleted,
    WebhookCreated,
    WebhookDeleted,
    LoginProviderCreated,
    LoginProviderDeleted,
    UserLoggedIn,
    LoginRefused,
    LoginExpired,
    UserDeleted,
}

impl EventKind {
    pub const ALL: [EventKind; 30] = [
        EventKind::TailnetCreated,
        EventKind::TailnetDeleted,
        EventKind::TailnetExpired,
        EventKind::KeyCreated,
        EventKind::KeyRevoked,
        EventKind::NodeJoined,
        EventKind::NodeLeft,
        EventKind::PolicyChanged,
        EventKind::TrustRuleCreated,
        EventKind::TrustRuleDeleted,
        EventKind::UpstreamSet,
        EventKind::GatewayRequest,
        EventKind::GatewayBlocked,
        EventKind::AdminTokenCreated,
        EventKind::AdminTokenRevoked,
        EventKind::PolicyProposed,
        EventKind::PolicyApproved,
        EventKind::PolicyRejected,
        EventKind::PolicyProposalExpired,
        EventKind::PolicyApprovalSet,
        EventKind::AdminTrustRuleCreated,
        EventKind::AdminTrustRuleDeleted,
        EventKind::WebhookCreated,
        EventKind::WebhookDeleted,
        EventKind::LoginProviderCreated,
        EventKind::LoginProviderDeleted,
        EventKind::UserLoggedIn,
        EventKind::LoginRefused,
        EventKind::LoginExpired,
        EventKind::UserDeleted,
    ];

    /// The name webhooks select and deliver it by: `node_joined`, `gateway_blocked`, ...
    pub fn name(self) -> String {
        let debug = format!("{self:?}");
        let mut out = String::new();
        for (i, c) in debug.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A tool call seen in a gateway response.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    pub name: String,
    pub arguments: String,
    pub blocked: bool,
}

/// What the gateway did with a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Passed to the upstream, which answered (also the state of a request not yet decided).
    #[default]
    Allowed,
    /// Refused by a rule of the policy (model, rate, budget, no grant).
    Denied,
    /// Cut off because the upstream's answer called a denied tool.
    Blocked,
    /// Could not be served (upstream unreachable or failing, client gone, bad request). Also what an
    /// unknown stored value reads as.
    #[serde(other)]
    Failed,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Blocked => "blocked",
            Decision::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request through a gateway, as its audit event records it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GatewayRequest {
    pub request_id: String,
    pub api: String,
    pub model: String,
    pub upstream: String,
    pub upstream_model: String,
    pub status: u16,
    pub decision: Decision,
    pub rule: String,
    pub message: String,
    pub stream: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub tool_calls: Vec<ToolCallRecord>,
    pub latency_us: u64,
    pub ttfb_us: u64,
    pub hostname: String,
    pub tags: Vec<String>,
    pub owner: String,
    pub request_body: Option<String>,
    pub response_body: Option<String>,
    #[serde(default)]
    pub charged_tokens: u64,
}

/// One entry of the audit log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub id: Uuid,
    pub revision: u64,
    pub time: SystemTime,
    pub kind: EventKind,
    pub tailnet_id: Option<TailnetId>,
    pub node_id: Option<NodeId>,
    pub auth_key_id: Option<AuthKeyId>,
    pub actor: String,
    pub reason: String,
    pub summary: String,
    #[serde(default)]
    pub run: Option<RunIdentity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Box<GatewayRequest>>,
    /// The person the event is about, with their groups at the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<NodeUser>,
}

/// Why a node's netmap stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    NodeRemoved,
    KeyRevoked,
    TailnetDeleted,
    TailnetExpired,
    NodeExpired,
    ServerShutdown,
    LoginExpired,
    UserDeleted,
}

impl EndReason {
    /// Whether the node may reconnect with the same session.
    pub fn retry(self) -> bool {
        self == EndReason::ServerShutdown
    }
}

/// Who did something: an admin token, a node, or the server itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    pub fn system(component: &str) -> Self {
        Actor(format!("system:{component}"))
    }

    pub fn node(id: NodeId) -> Self {
        Actor(format!("node:{id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_map_is_a_unique_local_prefix_per_tailnet_with_the_ipv4_address_inside() {
        let (a, b) = (TailnetId::generate(), TailnetId::generate());
        let (map_a, map_b) = (Ipv6Map::of(a), Ipv6Map::of(b));
        assert_eq!(map_a, Ipv6Map::of(a), "derived, not random");
        let v4 = Ipv4Addr::new(100, 64, 0, 7);
        let v6 = map_a.address(v4);
        assert_eq!(v6.octets()[0], 0xfd);
        assert_eq!(v6.octets()[6..12], [0; 6]);
        assert_eq!(v6.octets()[12..], v4.octets());
        assert_ne!(v6, map_b.address(v4), "tailnets get different prefixes");
        let (net, len) = map_a.network((Ipv4Addr::new(100, 64, 0, 0), 10));
        assert_eq!(len, 106);
        assert_eq!(net, map_a.address(Ipv4Addr::new(100, 64, 0, 0)));
        assert_eq!(map_a.network((v4, 32)), (v6, 128));
    }
}
