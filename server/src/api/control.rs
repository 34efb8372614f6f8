//! `cordon.v1.Control`: the admin API.

use std::sync::Arc;

use cordon_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use super::{BoxStream, authorize, convert};
use crate::admin::{AdminTokens, OidcBearer};
use crate::control_plane::{ControlPlane, PROPOSAL_LIFETIME, PolicyChange, Target};
use crate::error::Error;
use crate::model::{Action, AdminTokenId, AuthKeyId, NodeId, Principal, ProposalId, TailnetId, TrustRuleId};
use crate::store::EventFilter;
use crate::time::from_timestamp;
use crate::validate;

pub struct ControlApi {
    cp: Arc<ControlPlane>,
    tokens: Arc<AdminTokens>,
}

impl ControlApi {
    pub fn new(cp: Arc<ControlPlane>, tokens: Arc<AdminTokens>) -> Self {
        ControlApi { cp, tokens }
    }

    /// The caller, if its role may do `action`: an admin token the interceptor recognised, or an OIDC
    /// ID token that an admin trust rule accepts (keyless orchestration).
    async fn principal<T>(&self, req: &Request<T>, action: Action, call: &str) -> Result<Principal, Status> {
        let principal = match (req.extensions().get::<Principal>(), req.extensions().get::<OidcBearer>()) {
            (Some(p), _) => p.clone(),
            (None, Some(OidcBearer(token))) => match self.tokens.oidc_session(token, self.cp.now()) {
                Some(p) => p,
                None => {
                    let rules = crate::oidc::unverified_issuer(token).map(|i| self.tokens.rules_for(&i));
                    let (p, until) = self.cp.verify_admin_oidc(token, rules.unwrap_or_default()).await?;
                    self.tokens.remember_oidc_session(token, p.clone(), until);
                    p
                }
            },
            (None, None) => return Err(Status::unauthenticated("missing admin token")),
        };
        authorize(principal, action, call)
    }

    /// Refuses a tailnet outside the caller's owner scope as not found, exactly as a missing one: a
    /// scoped token learns nothing of other owners' tailnets.
    async fn in_scope(&self, p: &Principal, tailnet: TailnetId) -> Result<(), Error> {
        let Some(scope) = &p.scope else { return Ok(()) };
        match self.cp.get_tailnet(tailnet).await? {
            t if &t.owner == scope => Ok(()),
            _ => Err(Error::not_found("tailnet", tailnet)),
        }
    }

    /// The same for a node, key or rule found by its own id: out of scope is "not found" under its name.
    async fn target_in_scope(
        &self,
        p: &Principal,
        tailnet: TailnetId,
        what: &'static str,
        id: impl ToString,
    ) -> Result<(), Error> {
        self.in_scope(p, tailnet).await.map_err(|_| Error::not_found(what, id.to_string()))
    }

    /// The caller of ApprovePolicy or RejectPolicy, if it may decide the proposal it names.
    async fn decision(
        &self,
        req: Request<pb::DecidePolicyRequest>,
        call: &str,
    ) -> Result<(Principal, ProposalId, String), Status> {
        let p = self.principal(&req, Action::Approve, call).await?;
        let req = req.into_inner();
        let id = ProposalId::parse("id", &req.id)?;
        validate::reason("reason", &req.reason)?;
        if p.scope.is_some() {
            let tailnet = self.cp.proposal(id).await?.tailnet_id;
            self.target_in_scope(&p, tailnet, "policy proposal", id).await?;
        }
        Ok((p, id, req.reason))
    }

    /// A webhook the caller may see (another scope's is "not found").
    async fn visible_webhook(&self, p: &Principal, id: &str) -> Result<crate::model::Webhook, Error> {
        let id = crate::model::WebhookId::parse("id", id)?;
        match self.cp.webhook(id).await? {
            Some(w) if p.scope.is_none() || w.owner_scope == p.scope => Ok(w),
            _ => Err(Error::not_found("webhook", id)),
        }
    }

    /// Whether the caller sees a user: unscoped callers see everyone; scoped ones, the people who
    /// logged into one of their tailnets.
    async fn user_visible(&self, p: &Principal, user: &crate::model::User) -> bool {
        if p.scope.is_none() {
            return true;
        }
        for t in &user.tailnets {
            if self.in_scope(p, *t).await.is_ok() {
                return true;
            }
        }
        false
    }

    /// Scoped tokens read events of one tailnet at a time (events of a deleted tailnet no longer say
    /// whose it was).
    async fn events_scope(&self, p: &Principal, tailnet: Option<TailnetId>) -> Result<(), Error> {
        match (tailnet, &p.scope) {
            (Some(t), _) => self.in_scope(p, t).await,
            (None, Some(scope)) => Err(Error::invalid(
                "tailnet_id",
                format!("is required for a token scoped to owner {}", validate::quote(scope)),
            )),
            (None, None) => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlApi {
    async fn create_tailnet(&self, req: Request<pb::CreateTailnetRequest>) -> Result<Response<pb::Tailnet>, Status> {
        let p = self.principal(&req, Action::Write, "CreateTailnet").await?;
        let spec = convert::tailnet_spec(req.into_inner())?;
        if !p.sees_owner(&spec.owner) {
            return Err(Error::PermissionDenied(format!(
                "owner: this token is scoped to owner {}; it creates tailnets of that owner only",
                validate::quote(p.scope.as_deref().unwrap_or_default())
            ))
            .into());
        }
        let tailnet = self.cp.create_tailnet(spec, &p.actor).await?;
        Ok(Response::new(convert::tailnet(&tailnet)))
    }

    async fn get_tailnet(&self, req: Request<pb::GetTailnetRequest>) -> Result<Response<pb::Tailnet>, Status> {
        let p = self.principal(&req, Action::Read, "GetTailnet").await?;
        let id = TailnetId::parse("id", &req.get_ref().id)?;
        let tailnet = self.cp.get_tailnet(id).await?;
        if !p.sees_owner(&tailnet.owner) {
            return Err(Error::not_found("tailnet", id).into());
        }
        Ok(Response::new(convert::tailnet(&tailnet)))
    }

    async fn list_tailnets(
        &self,
        req: Request<pb::ListTailnetsRequest>,
    ) -> Result<Response<pb::ListTailnetsResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListTailnets").await?;
        let req = req.into_inner();
        let owner = if req.owner.is_empty() {
            None
        } else {
            validate::owner("owner", &req.owner)?;
            Some(req.owner.as_str())
        };
        // A scoped token lists its owner's tailnets only (none, if it asks for another owner's).
        if owner.is_some_and(|o| !p.sees_owner(o)) {
            return Ok(Response::new(pb::ListTailnetsResponse::default()));
        }
        let owner = owner.or(p.scope.as_deref());
        let selector = validate::label_selector("label_selector", &req.label_selector)?;
        let limit = validate::page_size("page_size", req.page_size)?;
        let after = convert::page_token("page_token", &req.page_token, |t| TailnetId::parse("", t).ok())?;
        let (tailnets, more) = self.cp.list_tailnets(owner, &selector, after, limit).await?;
        let next_page_token = match (more, tailnets.last()) {
            (true, Some(last)) => last.id.to_string(),
            _ => String::new(),
        };
        let tailnets = tailnets.iter().map(convert::tailnet).collect();
        Ok(Response::new(pb::ListTailnetsResponse { tailnets, next_page_token }))
    }

    async fn delete_tailnet(
        &self,
        req: Request<pb::DeleteTailnetRequest>,
    ) -> Result<Response<pb::DeleteTailnetResponse>, Status> {
        let p = self.principal(&req, Action::Write, "DeleteTailnet").await?;
        let req = req.into_inner();
        let id = TailnetId::parse("id", &req.id)?;
        validate::reason("reason", &req.reason)?;
        self.in_scope(&p, id).await?;
        let removed = self.cp.delete_tailnet(id, &req.reason, &p.actor).await?;
        Ok(Response::new(pb::DeleteTailnetResponse {
            nodes_revoked: removed.nodes.len() as u32,
            keys_deleted: removed.keys,
        }))
    }

    async fn create_auth_key(
        &self,
        req: Request<pb::CreateAuthKeyRequest>,
    ) -> Result<Response<pb::CreateAuthKeyResponse>, Status> {
        let p = self.principal(&req, Action::Write, "CreateAuthKey").await?;
        let spec = convert::auth_key_spec(req.into_inner())?;
        self.in_scope(&p, spec.tailnet_id).await?;
        let (key, secret) = self.cp.create_auth_key(spec, &p).await?;
        Ok(Response::new(pb::CreateAuthKeyResponse {
            key: Some(convert::auth_key(&key, self.cp.now())),
            secret: secret.into_exposed(),
        }))
    }

    async fn list_auth_keys(
        &self,
        req: Request<pb::ListAuthKeysRequest>,
    ) -> Result<Response<pb::ListAuthKeysResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListAuthKeys").await?;
        let tailnet = TailnetId::parse("tailnet_id", &req.get_ref().tailnet_id)?;
        self.in_scope(&p, tailnet).await?;
        let now = self.cp.now();
        let keys = self.cp.list_auth_keys(tailnet).await?.iter().map(|k| convert::auth_key(k, now)).collect();
        Ok(Response::new(pb::ListAuthKeysResponse { keys }))
    }

    async fn revoke_auth_key(
        &self,
        req: Request<pb::RevokeAuthKeyRequest>,
    ) -> Result<Response<pb::RevokeAuthKeyResponse>, Status> {
        let p = self.principal(&req, Action::Write, "RevokeAuthKey").await?;
        let req = req.into_inner();
        let id = AuthKeyId::parse("id", &req.id)?;
        validate::reason("reason", &req.reason)?;
        if p.scope.is_some() {
            self.target_in_scope(&p, self.cp.tailnet_of(Target::AuthKey(id)).await?, "auth key", id).await?;
        }
        let nodes = self.cp.revoke_auth_key(id, &req.reason, req.keep_nodes, &p.actor).await?;
        Ok(Response::new(pb::RevokeAuthKeyResponse { nodes_revoked: nodes.len() as u32 }))
    }

    async fn set_policy(&self, req: Request<pb::SetPolicyRequest>) -> Result<Response<pb::PolicyVersion>, Status> {
        let p = self.principal(&req, Action::Write, "SetPolicy").await?;
        let actor = p.actor.clone();
        let req = req.into_inner();
        let tailnet = TailnetId::parse("tailnet_id", &req.tailnet_id)?;
        validate::reason("reason", &req.reason)?;
        validate::reason("author", &req.author)?;
        self.in_scope(&p, tailnet).await?;
        if req.policy_json.trim().is_empty() {
            return Err(Error::invalid("policy_json", "is required (an empty object {} denies everything)").into());
        }
        Ok(Response::new(match self.cp.set_policy(tailnet, req.policy_json, req.author, req.reason, &actor).await? {
            PolicyChange::Set(record) => convert::policy_version(&record),
            PolicyChange::Proposed(proposal) => pb::PolicyVersion {
                tailnet_id: proposal.tailnet_id.to_string(),
                version: 0,
                summary: format!("proposed, waiting for approval: {}", proposal.summary),
                proposal: Some(convert::proposal(&proposal)),
                ..Default::default()
            },
        }))
    }

    async fn get_policy(&self, req: Request<pb::GetPolicyRequest>) -> Result<Response<pb::PolicyVersion>, Status> {
        let p = self.principal(&req, Action::Read, "GetPolicy").await?;
        let req = req.into_inner();
        let tailnet = TailnetId::parse("tailnet_id", &req.tailnet_id)?;
        self.in_scope(&p, tailnet).await?;
        let record = self.cp.get_policy(tailnet, req.version).await?;
        Ok(Response::new(match record {
            Some(r) => convert::policy_version(&r),
            None => pb::PolicyVersion {
                tailnet_id: tailnet.to_string(),
                summary: "default policy: every node may reach every other".into(),
                ..Default::default()
            },
        }))
    }

    async fn list_policy_versions(
        &self,
        req: Request<pb::ListPolicyVersionsRequest>,
    ) -> Result<Response<pb::ListPolicyVersionsResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListPolicyVersions").await?;
        let tailnet = TailnetId::parse("tailnet_id", &req.get_ref().tailnet_id)?;
        self.in_scope(&p, tailnet).await?;
        let (versions, current_version) = self.cp.policy_history(tailnet).await?;
        let versions = versions.iter().map(convert::policy_version).collect();
        Ok(Response::new(pb::ListPolicyVersionsResponse { versions, current_version }))
    }

    async fn test_policy(
        &self,
        req: Request<pb::TestPolicyRequest>,
    ) -> Result<Response<pb::TestPolicyResponse>, Status> {
        let p = self.principal(&req, Action::Read, "TestPolicy").await?;
        let req = req.into_inner();
        let tailnet = optional_id(&req.tailnet_id, |s| TailnetId::parse("tailnet_id", s))?;
        if let Some(t) = tailnet {
            self.in_scope(&p, t).await?;
        }
        if req.policy_json.trim().is_empty() {
            return Err(Error::invalid("policy_json", "is required (an empty object {} denies everything)").into());
        }
        let (policy, summary) = self.cp.test_policy(tailnet, &req.policy_json).await?;
        Ok(Response::new(pb::TestPolicyResponse {
            tests_passed: policy.tests.len() as u32,
            grants: policy.grants.len() as u32,
            summary,
        }))
    }

    async fn create_trust_rule(
        &self,
        req: Request<pb::CreateTrustRuleRequest>,
    ) -> Result<Response<pb::TrustRule>, Status> {
        let p = self.principal(&req, Action::Write, "CreateTrustRule").await?;
        let spec = convert::trust_rule_spec(req.into_inner())?;
        self.in_scope(&p, spec.tailnet_id).await?;
        let rule = self.cp.create_trust_rule(spec, &p).await?;
        Ok(Response::new(convert::trust_rule(&rule)))
    }

    async fn list_trust_rules(
        &self,
        req: Request<pb::ListTrustRulesRequest>,
    ) -> Result<Response<pb::ListTrustRulesResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListTrustRules").await?;
        let tailnet = TailnetId::parse("tailnet_id", &req.get_ref().tailnet_id)?;
        self.in_scope(&p, tailnet).await?;
        let rules = self.cp.list_trust_rules(tailnet).await?.iter().map(convert::trust_rule).collect();
        Ok(Response::new(pb::ListTrustRulesResponse { rules }))
    }

    async fn delete_trust_rule(
        &self,
        req: Request<pb::DeleteTrustRuleRequest>,
    ) -> Result<Response<pb::DeleteTrustRuleResponse>, Status> {
        let p = self.principal(&req, Action::Write, "DeleteTrustRule").await?;
        let id = TrustRuleId::parse("id", &req.get_ref().id)?;
        if p.scope.is_some() {
            self.target_in_scope(&p, self.cp.tailnet_of(Target::TrustRule(id)).await?, "trust rule", id).await?;
        }
        self.cp.delete_trust_rule(id, &p.actor).await?;
        Ok(Response::new(pb::DeleteTrustRuleResponse {}))
    }

    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListNodes").await?;
        let tailnet = TailnetId::parse("tailnet_id", &req.get_ref().tailnet_id)?;
        self.in_scope(&p, tailnet).await?;
        let hub = self.cp.hub();
        // The gateway is the server's own, not a machine the caller admitted.
        let listed: Vec<_> = self.cp.list_nodes(tailnet).await?.into_iter().filter(|n| !n.gateway).collect();
        let ids: Vec<_> = listed.iter().map(|n| n.id).collect();
        let elsewhere = self.cp.online_elsewhere(&ids).await?;
        let nodes = listed
            .iter()
            .map(|n| {
                let mut info = convert::node(n, hub);
                info.online |= elsewhere.contains(&n.id);
                info
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(&self, req: Request<pb::GetNodeRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let p = self.principal(&req, Action::Read, "GetNode").await?;
        let id = NodeId::parse("id", &req.get_ref().id)?;
        let node = self.cp.get_node(id).await?;
        if node.gateway {
            return Err(Error::not_found("node", id).into());
        }
        self.target_in_scope(&p, node.tailnet_id, "node", id).await?;
        let mut info = convert::node(&node, self.cp.hub());
        info.online |= !self.cp.online_elsewhere(&[id]).await?.is_empty();
        Ok(Response::new(info))
    }

    async fn delete_node(
        &self,
        req: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::DeleteNodeResponse>, Status> {
        let p = self.principal(&req, Action::Write, "DeleteNode").await?;
        let req = req.into_inner();
        let id = NodeId::parse("id", &req.id)?;
        validate::reason("reason", &req.reason)?;
        if p.scope.is_some() {
            self.target_in_scope(&p, self.cp.get_node(id).await?.tailnet_id, "node", id).await?;
        }
        self.cp.remove_node(id, crate::model::EndReason::NodeRemoved, "node deleted", &req.reason, &p.actor).await?;
        Ok(Response::new(pb::DeleteNodeResponse {}))
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListAuditEvents").await?;
        let req = req.into_inner();
        let filter = EventFilter {
            tailnet: optional_id(&req.tailnet_id, |s| TailnetId::parse("tailnet_id", s))?,
            node: optional_id(&req.node_id, |s| NodeId::parse("node_id", s))?,
            since: req.since.as_ref().map(|t| from_timestamp("since", t)).transpose()?,
            until: req.until.as_ref().map(|t| from_timestamp("until", t)).transpose()?,
            after_revision: convert::page_token("page_token", &req.page_token, |t| t.parse().ok())?.unwrap_or(0),
            limit: validate::page_size("page_size", req.page_size)?,
        };
        if let (Some(since), Some(until)) = (filter.since, filter.until)
            && until < since
        {
            return Err(Error::invalid("until", "is before since").into());
        }
        self.events_scope(&p, filter.tailnet).await?;
        let (events, more) = self.cp.list_events(&filter).await?;
        let next_page_token = match (more, events.last()) {
            (true, Some(last)) => last.revision.to_string(),
            _ => String::new(),
        };
        let events = events.iter().map(convert::event).collect();
        Ok(Response::new(pb::ListAuditEventsResponse { events, next_page_token }))
    }

    async fn set_upstream(&self, req: Request<pb::SetUpstreamRequest>) -> Result<Response<pb::UpstreamInfo>, Status> {
        let p = self.principal(&req, Action::Write, "SetUpstream").await?;
        let req = req.into_inner();
        let tailnet = TailnetId::parse("tailnet_id", &req.tailnet_id)?;
        let spec = convert::upstream_spec("", req.name, req.kind, req.base_url, req.api_key)?;
        self.in_scope(&p, tailnet).await?;
        let info = self.cp.set_upstream(tailnet, spec, &p.actor).await?;
        Ok(Response::new(convert::upstream(&info)))
    }

    async fn get_relay_stats(
        &self,
        req: Request<pb::GetRelayStatsRequest>,
    ) -> Result<Response<pb::RelayStats>, Status> {
        let p = self.principal(&req, Action::Read, "GetRelayStats").await?;
        if let Some(scope) = &p.scope {
            return Err(Error::PermissionDenied(format!(
                "GetRelayStats counts every tailnet's traffic; this token is scoped to owner {}",
                validate::quote(scope)
            ))
            .into());
        }
        let c = self.cp.relays.counts();
        Ok(Response::new(pb::RelayStats {
            forwarded_frames: c.forwarded_frames,
            forwarded_bytes: c.forwarded_bytes,
            dropped_unknown_peer: c.dropped_unknown_peer,
            dropped_oversize: c.dropped_oversize,
            dropped_rate: c.dropped_rate,
            dropped_overflow: c.dropped_overflow,
        }))
    }

    type WatchEventsStream = BoxStream<pb::Event>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let p = self.principal(&req, Action::Read, "WatchEvents").await?;
        let req = req.into_inner();
        let tailnet = optional_id(&req.tailnet_id, |s| TailnetId::parse("tailnet_id", s))?;
        self.events_scope(&p, tailnet).await?;
        // Subscribe before reading the backlog so that nothing falls between the two.
        let mut live = self.cp.hub().subscribe_events();
        let mut shutdown = self.cp.shutdown_signal();
        let cp = self.cp.clone();
        let mut last = if req.since_revision > 0 { req.since_revision } else { cp.hub().published_revision() };
        let (tx, rx) = mpsc::channel(256);
        let open = cp.metrics.watch_stream("events");
        tokio::spawn(async move {
            let _counted = open;
            let mut backlog = match replay(&cp, tailnet, &mut last).await {
                Ok(events) => {
                    tracing::debug!(events = events.len(), last, "WatchEvents: replayed the stored events");
                    events
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            loop {
                for e in backlog.drain(..) {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = crate::control_plane::stopped(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("server shutting down; resume with since_revision"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    event = live.recv() => match event {
                        Ok(e) if e.revision <= last => {}
                        Ok(e) => {
                            last = e.revision;
                            if tailnet.is_none() || e.tailnet_id == tailnet {
                                backlog.push(convert::event(&e));
                            }
                        }
                        // Fell behind: catch up from the store, which holds every event.
                        Err(broadcast::error::RecvError::Lagged(_)) => match replay(&cp, tailnet, &mut last).await {
                            Ok(events) => backlog = events,
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        },
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn set_policy_approval(
        &self,
        req: Request<pb::SetPolicyApprovalRequest>,
    ) -> Result<Response<pb::Tailnet>, Status> {
        let p = self.principal(&req, Action::Govern, "SetPolicyApproval").await?;
        let req = req.into_inner();
        let tailnet = TailnetId::parse("tailnet_id", &req.tailnet_id)?;
        validate::reason("reason", &req.reason)?;
        self.in_scope(&p, tailnet).await?;
        let tailnet = self.cp.set_policy_approval(tailnet, req.required, &req.reason, &p.actor).await?;
        Ok(Response::new(convert::tailnet(&tailnet)))
    }

    async fn propose_policy(
        &self,
        req: Request<pb::ProposePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let p = self.principal(&req, Action::Write, "ProposePolicy").await?;
        let req = req.into_inner();
        let tailnet = TailnetId::parse("tailnet_id", &req.tailnet_id)?;
        validate::reason("reason", &req.reason)?;
        validate::reason("author", &req.author)?;
        if req.policy_json.trim().is_empty() {
            return Err(Error::invalid("policy_json", "is required (an empty object {} denies everything)").into());
        }
        let lifetime = match req.expires_in_seconds {
            0 => PROPOSAL_LIFETIME,
            s if s <= validate::TTL_MAX => std::time::Duration::from_secs(s),
            s => {
                let rule = format!("{s} is more than 2592000 (30 days)");
                return Err(Error::invalid("expires_in_seconds", rule).into());
            }
        };
        self.in_scope(&p, tailnet).await?;
        let proposal =
            self.cp.propose_policy(tailnet, req.policy_json, req.author, req.reason, lifetime, &p.actor).await?;
        Ok(Response::new(convert::proposal(&proposal)))
    }

    async fn approve_policy(
        &self,
        req: Request<pb::DecidePolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let (p, id, reason) = self.decision(req, "ApprovePolicy").await?;
        let record = self.cp.approve_policy(id, &reason, &p.actor).await?;
        Ok(Response::new(convert::policy_version(&record)))
    }

    async fn reject_policy(
        &self,
        req: Request<pb::DecidePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let (p, id, reason) = self.decision(req, "RejectPolicy").await?;
        let proposal = self.cp.reject_policy(id, &reason, &p.actor).await?;
        Ok(Response::new(convert::proposal(&proposal)))
    }

    async fn list_policy_proposals(
        &self,
        req: Request<pb::ListPolicyProposalsRequest>,
    ) -> Result<Response<pb::ListPolicyProposalsResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListPolicyProposals").await?;
        let tailnet = TailnetId::parse("tailnet_id", &req.get_ref().tailnet_id)?;
        self.in_scope(&p, tailnet).await?;
        let proposals = self.cp.list_proposals(tailnet).await?.iter().map(convert::proposal).collect();
        Ok(Response::new(pb::ListPolicyProposalsResponse { proposals }))
    }

    async fn create_webhook(&self, req: Request<pb::CreateWebhookRequest>) -> Result<Response<pb::Webhook>, Status> {
        let p = self.principal(&req, Action::Write, "CreateWebhook").await?;
        let hook = convert::webhook(req.into_inner(), p.scope.clone(), &p.actor, self.cp.now())?;
        self.events_scope(&p, hook.tailnet_id).await?;
        let hook = self.cp.create_webhook(hook, &p.actor).await?;
        Ok(Response::new(convert::webhook_message(&hook)))
    }

    async fn list_webhooks(
        &self,
        req: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListWebhooks").await?;
        let tailnet = optional_id(&req.get_ref().tailnet_id, |s| TailnetId::parse("tailnet_id", s))?;
        let webhooks = self
            .cp
            .list_webhooks()
            .await?
            .iter()
            .filter(|w| p.scope.is_none() || w.owner_scope == p.scope)
            .filter(|w| tailnet.is_none() || w.tailnet_id == tailnet)
            .map(convert::webhook_message)
            .collect();
        Ok(Response::new(pb::ListWebhooksResponse { webhooks }))
    }

    async fn delete_webhook(
        &self,
        req: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let p = self.principal(&req, Action::Write, "DeleteWebhook").await?;
        let hook = self.visible_webhook(&p, &req.get_ref().id).await?;
        self.cp.delete_webhook(&hook, &p.actor).await?;
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

    async fn list_webhook_deliveries(
        &self,
        req: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListWebhookDeliveries").await?;
        let req = req.into_inner();
        let hook = self.visible_webhook(&p, &req.webhook_id).await?;
        let limit = match req.limit {
            0 => 100,
            n => (n as usize).min(1000),
        };
        let deliveries = self.cp.deliveries(hook.id, limit).await?.iter().map(convert::delivery).collect();
        Ok(Response::new(pb::ListWebhookDeliveriesResponse { deliveries }))
    }

    async fn get_access_report(
        &self,
        req: Request<pb::GetAccessReportRequest>,
    ) -> Result<Response<pb::AccessReport>, Status> {
        let p = self.principal(&req, Action::Read, "GetAccessReport").await?;
        let tailnet = TailnetId::parse("tailnet_id", &req.get_ref().tailnet_id)?;
        self.in_scope(&p, tailnet).await?;
        let report = crate::access::report(&self.cp, tailnet).await?;
        Ok(Response::new(convert::access_report(&report)))
    }

    async fn create_admin_trust_rule(
        &self,
        req: Request<pb::CreateAdminTrustRuleRequest>,
    ) -> Result<Response<pb::AdminTrustRule>, Status> {
        let p = self.principal(&req, Action::ManageTokens, "CreateAdminTrustRule").await?;
        let rule = convert::admin_trust_rule_spec(req.into_inner(), &p.actor, self.cp.now())?;
        let rule = self.cp.create_admin_trust_rule(rule, &p).await?;
        self.tokens.set_rules(self.cp.list_admin_trust_rules(None).await?);
        Ok(Response::new(convert::admin_trust_rule(&rule)))
    }

    async fn list_admin_trust_rules(
        &self,
        req: Request<pb::ListAdminTrustRulesRequest>,
    ) -> Result<Response<pb::ListAdminTrustRulesResponse>, Status> {
        let p = self.principal(&req, Action::ManageTokens, "ListAdminTrustRules").await?;
        let rules = self.cp.list_admin_trust_rules(Some(&p)).await?.iter().map(convert::admin_trust_rule).collect();
        Ok(Response::new(pb::ListAdminTrustRulesResponse { rules }))
    }

    async fn create_login_provider(
        &self,
        req: Request<pb::CreateLoginProviderRequest>,
    ) -> Result<Response<pb::LoginProvider>, Status> {
        let p = self.principal(&req, Action::Govern, "CreateLoginProvider").await?;
        let provider = convert::login_provider_spec(req.into_inner(), &p.actor, self.cp.now())?;
        match provider.tailnet_id {
            Some(t) => self.in_scope(&p, t).await?,
            None if p.scope.is_some() => {
                return Err(Status::permission_denied(
                    "tailnet_id: a credential scoped to one owner makes login providers of its tailnets only",
                ));
            }
            None => {}
        }
        let provider = self.cp.create_login_provider(provider, &p.actor).await?;
        Ok(Response::new(convert::login_provider(&provider)))
    }

    async fn list_login_providers(
        &self,
        req: Request<pb::ListLoginProvidersRequest>,
    ) -> Result<Response<pb::ListLoginProvidersResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListLoginProviders").await?;
        let tailnet = optional_id(&req.get_ref().tailnet_id, |s| TailnetId::parse("tailnet_id", s))?;
        if let Some(t) = tailnet {
            self.in_scope(&p, t).await?;
        }
        let mut providers = Vec::new();
        for provider in self.cp.login_providers().await? {
            let shown = match (provider.tailnet_id, tailnet) {
                (Some(of), Some(t)) => of == t,
                (None, _) => true,
                (Some(of), None) => self.in_scope(&p, of).await.is_ok(),
            };
            if shown {
                providers.push(convert::login_provider(&provider));
            }
        }
        Ok(Response::new(pb::ListLoginProvidersResponse { providers }))
    }

    async fn delete_login_provider(
        &self,
        req: Request<pb::DeleteLoginProviderRequest>,
    ) -> Result<Response<pb::DeleteLoginProviderResponse>, Status> {
        let p = self.principal(&req, Action::Govern, "DeleteLoginProvider").await?;
        let req = req.into_inner();
        let id = crate::model::LoginProviderId::parse("id", &req.id)?;
        validate::reason("reason", &req.reason)?;
        let provider = self.cp.login_providers().await?.into_iter().find(|x| x.id == id);
        let visible = match &provider {
            Some(x) => match x.tailnet_id {
                Some(t) => self.in_scope(&p, t).await.is_ok(),
                None => p.scope.is_none(),
            },
            None => false,
        };
        let Some(provider) = provider.filter(|_| visible) else {
            return Err(Error::not_found("login provider", id).into());
        };
        self.cp.delete_login_provider(&provider, &req.reason, &p.actor).await?;
        Ok(Response::new(pb::DeleteLoginProviderResponse {}))
    }

    async fn list_users(&self, req: Request<pb::ListUsersRequest>) -> Result<Response<pb::ListUsersResponse>, Status> {
        let p = self.principal(&req, Action::Read, "ListUsers").await?;
        let tailnet = optional_id(&req.get_ref().tailnet_id, |s| TailnetId::parse("tailnet_id", s))?;
        if let Some(t) = tailnet {
            self.in_scope(&p, t).await?;
        }
        let mut users = Vec::new();
        for user in self.cp.users().await? {
            let shown = match tailnet {
                Some(t) => user.tailnets.contains(&t),
                None => self.user_visible(&p, &user).await,
            };
            if shown {
                users.push(convert::user(&user, &[], self.cp.hub()));
            }
        }
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn get_user(&self, req: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        let p = self.principal(&req, Action::Read, "GetUser").await?;
        let (user, nodes) = self.cp.user(&req.get_ref().id).await?;
        if !self.user_visible(&p, &user).await {
            return Err(Error::not_found("user", validate::quote(&req.get_ref().id)).into());
        }
        let mut shown = Vec::new();
        for n in nodes {
            if self.in_scope(&p, n.tailnet_id).await.is_ok() {
                shown.push(n);
            }
        }
        Ok(Response::new(convert::user(&user, &shown, self.cp.hub())))
    }

    async fn delete_user(
        &self,
        req: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let p = self.principal(&req, Action::Write, "DeleteUser").await?;
        let req = req.into_inner();
        validate::reason("reason", &req.reason)?;
        let (user, nodes) = self.cp.user(&req.id).await?;
        if !self.user_visible(&p, &user).await {
            return Err(Error::not_found("user", validate::quote(&req.id)).into());
        }
        for n in &nodes {
            if self.in_scope(&p, n.tailnet_id).await.is_err() {
                return Err(Status::permission_denied(format!(
                    "id: {} also has nodes in tailnets outside this credential's scope; an unscoped credential                      deletes them",
                    user.email
                )));
            }
        }
        let removed = self.cp.delete_user(user.id, &req.reason, &p.actor).await?;
        Ok(Response::new(pb::DeleteUserResponse { nodes_removed: removed as u32 }))
    }

    async fn delete_admin_trust_rule(
        &self,
        req: Request<pb::DeleteAdminTrustRuleRequest>,
    ) -> Result<Response<pb::DeleteAdminTrustRuleResponse>, Status> {
        let p = self.principal(&req, Action::ManageTokens, "DeleteAdminTrustRule").await?;
        let id = crate::model::AdminTrustRuleId::parse("id", &req.get_ref().id)?;
        self.cp.delete_admin_trust_rule(id, &p).await?;
        self.tokens.set_rules(self.cp.list_admin_trust_rules(None).await?);
        Ok(Response::new(pb::DeleteAdminTrustRuleResponse {}))
    }

    async fn create_admin_token(
        &self,
        req: Request<pb::CreateAdminTokenRequest>,
    ) -> Result<Response<pb::CreateAdminTokenResponse>, Status> {
        let p = self.principal(&req, Action::ManageTokens, "CreateAdminToken").await?;
        let spec = convert::admin_token_spec(req.into_inner())?;
        let (token, secret) = self.cp.create_admin_token(spec, &p).await?;
        self.tokens.remember(token.clone());
        Ok(Response::new(pb::CreateAdminTokenResponse {
            token: Some(convert::admin_token(&token)),
            secret: secret.into_exposed(),
        }))
    }

    async fn list_admin_tokens(
        &self,
        req: Request<pb::ListAdminTokensRequest>,
    ) -> Result<Response<pb::ListAdminTokensResponse>, Status> {
        let p = self.principal(&req, Action::ManageTokens, "ListAdminTokens").await?;
        let tokens = self.cp.list_admin_tokens(Some(&p)).await?.iter().map(convert::admin_token).collect();
        Ok(Response::new(pb::ListAdminTokensResponse { tokens }))
    }

    async fn revoke_admin_token(
        &self,
        req: Request<pb::RevokeAdminTokenRequest>,
    ) -> Result<Response<pb::RevokeAdminTokenResponse>, Status> {
        let p = self.principal(&req, Action::ManageTokens, "RevokeAdminToken").await?;
        let req = req.into_inner();
        let id = AdminTokenId::parse("id", &req.id)?;
        validate::reason("reason", &req.reason)?;
        let token = self.cp.revoke_admin_token(id, &req.reason, &p).await?;
        self.tokens.remember(token);
        Ok(Response::new(pb::RevokeAdminTokenResponse {}))
    }

    async fn list_replicas(
        &self,
        req: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.principal(&req, Action::Read, "ListReplicas").await?;
        let replicas = self.cp.replicas().await?;
        Ok(Response::new(pb::ListReplicasResponse { replicas: replicas.iter().map(convert::replica).collect() }))
    }
}

/// The stored events after `last`, which it advances.
async fn replay(cp: &ControlPlane, tailnet: Option<TailnetId>, last: &mut u64) -> Result<Vec<pb::Event>, Error> {
    let mut out = Vec::new();
    loop {
        let filter = EventFilter { tailnet, after_revision: *last, limit: 1000, ..Default::default() };
        let (events, more) = cp.list_events(&filter).await?;
        for e in &events {
            *last = e.revision;
            out.push(convert::event(e));
        }
        if !more {
            return Ok(out);
        }
    }
}

fn optional_id<T>(s: &str, parse: impl FnOnce(&str) -> Result<T, Error>) -> Result<Option<T>, Error> {
    if s.is_empty() { Ok(None) } else { parse(s).map(Some) }
}
