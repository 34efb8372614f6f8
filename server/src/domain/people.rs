//! People: login providers, the users who log in through them, their nodes' logins and offboarding.
//! The device authorization grant itself runs in [`crate::login`]; what it proves arrives here as a
//! [`PersonLogin`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Draft, Policies, record, remove, tailnet};
use crate::error::{Error, Result};
use crate::hub::NetChange;
use crate::model::{
    Actor, EndReason, EventKind, LoginProvider, LoginProviderId, Node, NodeId, SecretHash, Tailnet, TailnetId, User,
    UserId,
};
use crate::store::{Placement, Tx};

/// What a verified ID token says about a person, and what their node asks for.
#[derive(Clone, Debug)]
pub struct PersonLogin {
    pub tailnet: TailnetId,
    pub provider: LoginProviderId,
    pub login_lifetime: Duration,
    pub issuer: String,
    pub subject: String,
    pub email: String,
    pub display_name: String,
    pub groups: Vec<String>,
    pub wireguard_public_key: [u8; 32],
    pub hostname: String,
    pub requested_tags: Vec<String>,
    pub endpoints: Vec<std::net::SocketAddr>,
}

pub async fn create_login_provider(tx: &mut Tx, provider: LoginProvider, actor: &Actor) -> Result<LoginProvider> {
    if let Some(t) = provider.tailnet_id {
        tailnet(tx, t).await?;
    }
    let taken =
        tx.login_providers().await?.into_iter().any(|p| p.tailnet_id == provider.tailnet_id && p.name == provider.name);
    if taken {
        let scope = provider.tailnet_id.map_or("the server".to_string(), |t| format!("tailnet {t}"));
        return Err(Error::invalid("name", format!("a login provider named {} already serves {scope}", provider.name)));
    }
    tx.put_login_provider(&provider).await?;
    record(
        tx,
        Draft {
            kind: EventKind::LoginProviderCreated,
            tailnet: provider.tailnet_id,
            actor,
            reason: &provider.reason,
            summary: format!(
                "login provider {} created: {} (client {}){}",
                provider.name,
                provider.issuer,
                provider.client_id,
                if provider.allowed_groups.is_empty() {
                    String::new()
                } else {
                    format!(", groups {}", provider.allowed_groups.join(", "))
                }
            ),
            ..Draft::at(provider.created_at)
        },
    );
    Ok(provider)
}

pub async fn delete_login_provider(
    tx: &mut Tx,
    provider: &LoginProvider,
    reason: &str,
    actor: &Actor,
    now: SystemTime,
) -> Result<()> {
    tx.delete_login_provider(provider.id).await?;
    record(
        tx,
        Draft {
            kind: EventKind::LoginProviderDeleted,
            tailnet: provider.tailnet_id,
            actor,
            reason,
            summary: format!("login provider {} ({}) deleted", provider.name, provider.issuer),
            ..Draft::at(now)
        },
    );
    Ok(())
}

/// The provider people of `tailnet` log in through: its own (the newest), else the server-wide one.
pub async fn login_provider_for(tx: &mut Tx, tailnet_id: TailnetId) -> Result<LoginProvider> {
    tailnet(tx, tailnet_id).await?;
    let mut providers = tx.login_providers().await?;
    providers.sort_by_key(|p| std::cmp::Reverse(p.id));
    let own = providers.iter().find(|p| p.tailnet_id == Some(tailnet_id));
    own.or_else(|| providers.iter().find(|p| p.tailnet_id.is_none())).cloned().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "tailnet_id: tailnet {tailnet_id} has no login provider (and the server has none); an operator \
             creates one with CreateLoginProvider"
        ))
    })
}

/// Admits (or re-admits) a person's node after their identity provider vouched for them: the user
/// record is created or refreshed, and a node with the same WireGuard key keeps its id and address.
pub async fn log_in(
    tx: &mut Tx,
    login: PersonLogin,
    session_hash: SecretHash,
    node_lifetime: Duration,
    policies: &Policies,
    now: SystemTime,
) -> Result<(Node, Tailnet, User)> {
    let mut tailnet = tailnet(tx, login.tailnet).await?;
    let policy = policies.current(tx, &tailnet).await?;
    for (i, tag) in login.requested_tags.iter().enumerate() {
        if !policy.explicit || !policy.person_owns_tag(tag, &login.email, &login.groups) {
            let owners = policy.tag_owners.get(tag).map(|o| o.join(", ")).unwrap_or_default();
            return Err(Error::PermissionDenied(format!(
                "requested_tags[{i}]: {tag} is owned by [{owners}]; {} is not among them",
                login.email
            )));
        }
    }
    let mut user = match tx.user_by_subject(&login.issuer, &login.subject).await? {
        Some(u) => u,
        None => User {
            id: UserId::generate(),
            issuer: login.issuer.clone(),
            subject: login.subject.clone(),
            email: String::new(),
            display_name: String::new(),
            groups: vec![],
            last_login: now,
            created_at: now,
            login_provider_id: login.provider,
            tailnets: vec![],
        },
    };
    user.email = login.email.clone();
    user.display_name = login.display_name.clone();
    user.groups = login.groups.clone();
    user.last_login = now;
    user.login_provider_id = login.provider;
    if !user.tailnets.contains(&tailnet.id) {
        user.tailnets.push(tailnet.id);
    }
    tx.put_user(&user).await?;

    let stamp = user.stamp(now + login.login_lifetime);
    let tagged = !login.requested_tags.is_empty();
    let (first, last) = (tailnet.cidr.first_node_address(), tailnet.cidr.last_node_address());
    let placement = tx.placement(tailnet.id, &login.wireguard_public_key, &login.hostname, first, last).await?;
    let (node, change, summary) = match placement {
        Placement::Existing(old) => {
            if old.user.as_ref().is_none_or(|u| u.id != user.id) {
                return Err(Error::PermissionDenied(format!(
                    "wireguard_public_key: it belongs to node {} ({}), which {} does not own; use a new key",
                    old.hostname, old.id, user.email
                )));
            }
            let mut node = (*old).clone();
            node.session_hash = session_hash;
            node.tags = login.requested_tags.clone();
            node.owner = user.email.clone();
            node.user = Some(stamp);
            node.expires_at = now + node_lifetime;
            node.endpoints = login.endpoints.clone();
            tx.put_node(&node, Some(&old)).await?;
            let summary = format!("node {} re-authenticated at {}", node.hostname, node.address);
            // Peers forgot a node whose login had expired: it comes back as a new peer.
            let change = if old.admitted() {
                NetChange::PeerUpdated(Arc::new(node.clone()))
            } else {
                NetChange::PeerAdded(Arc::new(node.clone()))
            };
            (node, change, summary)
        }
        Placement::New { address, hostname_taken } => {
            let (address, hostname) = super::new_place(tx, &tailnet, address, hostname_taken, &login.hostname).await?;
            let node = Node {
                id: NodeId::generate(),
                tailnet_id: tailnet.id,
                hostname,
                wireguard_public_key: login.wireguard_public_key,
                address,
                tags: login.requested_tags.clone(),
                owner: user.email.clone(),
                auth_key_id: None,
                ephemeral: false,
                created_at: now,
                expires_at: now + node_lifetime,
                session_hash,
                endpoints: login.endpoints.clone(),
                trust_rule_id: None,
                identity: None,
                gateway: false,
                user: Some(stamp),
            };
            tx.put_node(&node, None).await?;
            tailnet.node_count += 1;
            tx.put_tailnet(&tailnet).await?;
            let summary = format!("node {} joined at {}", node.hostname, node.address);
            (node.clone(), NetChange::PeerAdded(Arc::new(node)), summary)
        }
    };
    let groups = if user.groups.is_empty() { "no groups".to_string() } else { user.groups.join(", ") };
    record(
        tx,
        Draft {
            kind: EventKind::UserLoggedIn,
            tailnet: Some(tailnet.id),
            node: Some(node.id),
            actor: &Actor(format!("user:{}", user.email)),
            summary: format!(
                "{summary}: {} ({groups}) logged in{}",
                user.email,
                if tagged { format!(" with {}", node.tags.join(", ")) } else { String::new() }
            ),
            user: node.user.as_ref(),
            ..Draft::at(now)
        },
    );
    tx.netmap(tailnet.id, change);
    Ok((node, tailnet, user))
}

/// Records a login the identity provider or a rule refused. `who` is the person's email when known.
pub fn record_login_refused(tx: &mut Tx, tailnet: TailnetId, who: &str, why: &str, now: SystemTime) {
    let actor = Actor(if who.is_empty() { "user:unknown".into() } else { format!("user:{who}") });
    record(
        tx,
        Draft {
            kind: EventKind::LoginRefused,
            tailnet: Some(tailnet),
            actor: &actor,
            summary: format!("login refused: {why}"),
            ..Draft::at(now)
        },
    );
}

/// Ends the login of a person's node whose login expired: it keeps its id and address, its session
/// stops working, and its peers forget it until the person logs in again.
pub async fn expire_login(tx: &mut Tx, id: NodeId, now: SystemTime) -> Result<Option<Node>> {
    let found = tx.node(id).await?.ok_or_else(|| Error::not_found("node", id))?;
    tailnet(tx, found.tailnet_id).await?;
    let old = tx.node(id).await?.ok_or_else(|| Error::not_found("node", id))?;
    let Some(user) = old.user.as_ref().filter(|u| !u.logged_out && u.login_expires_at <= now) else {
        return Ok(None);
    };
    let mut node = old.clone();
    let mut stamp = user.clone();
    stamp.logged_out = true;
    node.user = Some(stamp);
    // Nobody knows this token: the old session is dead.
    node.session_hash = crate::secret::Secret::generate("").hash();
    tx.put_node(&node, Some(&old)).await?;
    let message = format!("the login of {} expired; run `agentd login` to log in again", user.email);
    record(
        tx,
        Draft {
            kind: EventKind::LoginExpired,
            tailnet: Some(node.tailnet_id),
            node: Some(node.id),
            actor: &Actor::system("reaper"),
            summary: format!("node {} ({}): {message}", node.hostname, node.address),
            user: node.user.as_ref(),
            ..Draft::at(now)
        },
    );
    tx.netmap(node.tailnet_id, NetChange::PeerRemoved { node: node.id, reason: EndReason::LoginExpired, message });
    Ok(Some(node))
}

/// Offboards a person: removes every node they own (each ends with the reason) and their record.
pub async fn delete_user(
    tx: &mut Tx,
    id: UserId,
    reason: &str,
    actor: &Actor,
    now: SystemTime,
) -> Result<(User, Vec<NodeId>)> {
    let user = tx.user(id).await?.ok_or_else(|| Error::not_found("user", id))?;
    let mut removed = Vec::new();
    for tailnet_id in &user.tailnets {
        let Ok(mut t) = tailnet(tx, *tailnet_id).await else { continue };
        let mine: Vec<Node> =
            tx.nodes_of(t.id).await?.into_iter().filter(|n| n.user.as_ref().is_some_and(|u| u.id == id)).collect();
        for node in &mine {
            let why = format!("its user {} was deleted", user.email);
            remove(tx, &mut t, node, EndReason::UserDeleted, &why, reason, actor, now).await?;
            removed.push(node.id);
        }
        if !mine.is_empty() {
            tx.put_tailnet(&t).await?;
        }
    }
    tx.delete_user(id).await?;
    record(
        tx,
        Draft {
            kind: EventKind::UserDeleted,
            actor,
            reason,
            summary: format!(
                "user {} ({} {}) deleted with {} node(s)",
                user.email,
                user.issuer,
                user.subject,
                removed.len()
            ),
            ..Draft::at(now)
        },
    );
    Ok((user, removed))
}

/// The nodes a person owns, in the tailnets they logged into.
pub async fn nodes_of_user(tx: &mut Tx, user: &User) -> Result<Vec<Node>> {
    let mut out = Vec::new();
    for t in &user.tailnets {
        out.extend(tx.nodes_of(*t).await?.into_iter().filter(|n| n.user.as_ref().is_some_and(|u| u.id == user.id)));
    }
    Ok(out)
}
