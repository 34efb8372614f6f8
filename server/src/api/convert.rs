//! Conversions between protobuf messages and domain records. Requests are validated here, so every
//! handler works on checked values; each failure names the request field.

use std::collections::BTreeMap;
use std::time::SystemTime;

use cordon_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::{
    AuthKey, AuthKeySpec, EndReason, Event, EventKind, Node, Registration, Tailnet, TailnetId, TailnetSpec,
};
use crate::secret::AUTH_KEY_PREFIX;
use crate::time::to_timestamp;
use crate::validate;

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
    Ok(TailnetSpec { name: req.name, owner: req.owner, ttl_seconds: req.ttl_seconds, labels, cidr, policy })
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

pub fn registration(req: pb::RegisterRequest) -> Result<Registration> {
    let auth_key = match req.credential {
        Some(pb::register_request::Credential::AuthKey(k)) => k,
        None => return Err(Error::invalid("credential", "is required: set auth_key")),
    };
    if !auth_key.starts_with(AUTH_KEY_PREFIX) {
        // Say nothing of the value: it may be some other secret pasted by mistake.
        return Err(Error::invalid(
            "auth_key",
            format!("is not a Cordon auth key (they start with {AUTH_KEY_PREFIX})"),
        ));
    }
    let wireguard_public_key = validate::wireguard_key("wireguard_public_key", &req.wireguard_public_key)?;
    let hostname = validate::hostname("hostname", &req.hostname)?;
    let requested_tags = validate::tags("requested_tags", &req.requested_tags)?;
    let endpoints = validate::endpoints("endpoints", &req.endpoints)?;
    Ok(Registration {
        auth_key_hash: crate::secret::hash(&auth_key),
        wireguard_public_key,
        hostname,
        requested_tags,
        endpoints,
    })
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
        gateway_address: t.cidr.gateway().to_string(),
        created_at: ts(t.created_at),
        expires_at: t.expires_at.map(to_timestamp),
        ttl_seconds: t.ttl_seconds,
        created_by: t.created_by.clone(),
        node_count: t.node_count,
        policy_version: t.policy_version,
    }
}

pub fn node(n: &Node, hub: &Hub) -> pb::NodeInfo {
    let (online, last_seen) = hub.presence(n.id);
    pb::NodeInfo {
        id: n.id.to_string(),
        tailnet_id: n.tailnet_id.to_string(),
        hostname: n.hostname.clone(),
        wireguard_public_key: n.wireguard_public_key.to_vec(),
        addresses: vec![n.address.to_string()],
        tags: n.tags.clone(),
        owner: n.owner.clone(),
        admission: Some(pb::Admission { auth_key_id: n.auth_key_id.map(|k| k.to_string()).unwrap_or_default() }),
        ephemeral: n.ephemeral,
        created_at: ts(n.created_at),
        last_seen: last_seen.map(to_timestamp),
        expires_at: ts(n.expires_at),
        online,
        endpoints: n.endpoints.iter().map(|e| e.to_string()).collect(),
    }
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
    }
}

/// A node's packet filter as the netmap carries it.
pub fn packet_filter(rules: Option<&[crate::policy::FilterRule]>) -> pb::PacketFilter {
    use crate::policy::Proto;
    let Some(rules) = rules else { return pb::PacketFilter { allow_all: true, rules: vec![] } };
    let rules = rules
        .iter()
        .map(|r| pb::FilterRule {
            sources: r.sources.iter().map(|(a, p)| format!("{a}/{p}")).collect(),
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
