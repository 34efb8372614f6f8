//! `cordon.v1.Node`: the API agentd calls to join a tailnet and follow its netmap.

use std::sync::Arc;

use cordon_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::{BoxStream, convert};
use crate::control_plane::ControlPlane;
use crate::error::Error;
use crate::hub::{NetChange, NetMapUpdate};
use crate::model::{Actor, EndReason, Ipv6Map, Node, NodeId, Tailnet};
use crate::netview::NetView;
use crate::store::Snapshot;

/// Frames per relay message, at most.
const RELAY_BATCH: usize = 64;
/// Bytes per relay message, about: well under a client's 4 MiB decoding limit.
const RELAY_BATCH_BYTES: usize = 256 * 1024;

/// A node's relay frames as its response stream: read from its mailbox by whoever sends the stream
/// (the HTTP/2 connection), so a frame takes no extra task on its way out. Batched for nodes that asked,
/// one frame per message for older ones. Ends when `ended` resolves, with its status if it carries one.
fn relay_outbound(
    mailbox: Arc<crate::relay::Mailbox>,
    ended: oneshot::Receiver<Option<Status>>,
    batches: bool,
) -> impl futures::Stream<Item = Result<pb::RelayPacket, Status>> + Send + 'static {
    futures::stream::unfold(Some((mailbox, ended)), move |state| async move {
        let (mailbox, mut ended) = state?;
        loop {
            tokio::select! {
                biased;
                why = &mut ended => return why.ok().flatten().map(|status| (Err(status), None)),
                () = mailbox.ready.notified() => {}
            }
            // A wakeup can find the frames taken already by the round before it.
            let mut frames = mailbox.take(if batches { RELAY_BATCH } else { 1 }, RELAY_BATCH_BYTES);
            let packet = match frames.pop() {
                None => continue,
                Some((from, data)) if !batches => pb::RelayPacket { peer_key: from.to_vec(), data, frames: vec![] },
                Some(last) => {
                    frames.push(last);
                    let frames =
                        frames.into_iter().map(|(from, data)| pb::RelayFrame { peer_key: from.to_vec(), data });
                    pb::RelayPacket { frames: frames.collect(), ..Default::default() }
                }
            };
            return Some((Ok(packet), Some((mailbox, ended))));
        }
    })
}

pub struct NodeApi {
    cp: Arc<ControlPlane>,
}

impl NodeApi {
    pub fn new(cp: Arc<ControlPlane>) -> Self {
        NodeApi { cp }
    }
}

/// This server's paths: its STUN reflector (the gateways' UDP port) and the relay.
fn paths(cp: &ControlPlane) -> pb::PathInfo {
    pb::PathInfo { stun_address: cp.stun_address.lock().unwrap().clone().unwrap_or_default(), relay: true }
}

fn full(view: &NetView, tailnet: &Tailnet, revision: u64, cp: &ControlPlane) -> pb::NetMap {
    let hub = cp.hub();
    pb::NetMap {
        revision,
        update: Some(pb::net_map::Update::Full(pb::FullNetMap {
            self_: Some(convert::node(view.me(), hub)),
            peers: view.peers().filter(|p| !p.gateway).map(|p| convert::node(p, hub)).collect(),
            gateway: view.peers().find(|p| p.gateway).map(|p| convert::node(p, hub)),
            tailnet_id: tailnet.id.to_string(),
            tailnet_name: tailnet.name.clone(),
            cidr: tailnet.cidr.to_string(),
            cidr6: convert::cidr6(tailnet),
            gateway_address: tailnet.cidr.gateway().to_string(),
            filter: Some(convert::packet_filter(view.filter().as_deref(), Ipv6Map::of(tailnet.id))),
            paths: Some(paths(cp)),
        })),
    }
}

fn ended(revision: u64, reason: EndReason, message: String) -> pb::NetMap {
    pb::NetMap {
        revision,
        update: Some(pb::net_map::Update::Ended(pb::StreamEnded {
            reason: convert::end_reason(reason).into(),
            message,
            retry: reason.retry(),
        })),
    }
}

/// The view of `me` from the store, under its tailnet's current policy.
async fn load_view(cp: &ControlPlane, me: NodeId) -> Result<(NetView, Tailnet, u64), Error> {
    let Snapshot { revision, node, tailnet, peers } = cp.snapshot(me).await?;
    let policy = cp.policy(&tailnet).await?;
    Ok((NetView::new(policy, node, peers, &tailnet), tailnet, revision))
}

/// How long a resuming stream waits for the revision of its snapshot to be published (it normally is).
const RESUME_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// For a node that holds the netmap of revision `since`: the delta that brings it to `view` (at
/// `revision`), if the hub remembers every change between. The peers those changes touched come as
/// they are now (updated, or removed when gone or no longer visible), with the filter and the node
/// itself. `None` (send a full map) when a change touched the whole tailnet or this node's own record,
/// or `since` is not one this server can resume from.
async fn resumed(view: &NetView, revision: u64, since: u64, cp: &ControlPlane) -> Option<pb::NetMap> {
    if since == 0 || since > revision {
        return None;
    }
    let hub = cp.hub();
    let me = view.me();
    if tokio::time::timeout(RESUME_WAIT, hub.published_at_least(revision)).await.is_err() {
        tracing::debug!(node = %me.id, since, revision, published = hub.published_revision(), "cannot resume: not published");
        return None;
    }
    let Some(touched) = hub.touched(me.tailnet_id, since, revision) else {
        tracing::debug!(node = %me.id, since, revision, "cannot resume: changes since are not all remembered, or one touched everything");
        return None;
    };
    if touched.contains(&me.id) {
        return None;
    }
    let visible: std::collections::HashMap<NodeId, &Node> =
        view.peers().filter(|p| touched.contains(&p.id)).map(|p| (p.id, p)).collect();
    let mut touched: Vec<NodeId> = touched.into_iter().collect();
    touched.sort();
    let gateway_id = view.gateway_id();
    let gone = |id: &&NodeId| !visible.contains_key(*id);
    let message = pb::NetMapDelta {
        peers_added: vec![],
        peers_updated: touched
            .iter()
            .filter_map(|id| visible.get(id))
            .filter(|n| !n.gateway)
            .map(|n| convert::node(n, hub))
            .collect(),
        peers_removed: touched
            .iter()
            .filter(gone)
            .filter(|id| Some(**id) != gateway_id)
            .map(ToString::to_string)
            .collect(),
        self_: Some(convert::node(me, hub)),
        filter: Some(convert::packet_filter(view.filter().as_deref(), Ipv6Map::of(me.tailnet_id))),
        gateway: visible.values().find(|n| n.gateway).map(|n| convert::node(n, hub)),
        gateway_removed: gateway_id.is_some_and(|g| touched.contains(&g) && !visible.contains_key(&g)),
        paths: Some(paths(cp)),
    };
    Some(pb::NetMap { revision, update: Some(pb::net_map::Update::Delta(message)) })
}

/// What one netmap change means for this node: a message to send, and whether the stream ends.
fn translate(view: &mut NetView, update: &NetMapUpdate, cp: &ControlPlane) -> (Option<pb::NetMap>, bool) {
    match &update.change {
        NetChange::PeerRemoved { node, reason, message } if *node == view.me().id => {
            return (Some(ended(update.revision, *reason, message.clone())), true);
        }
        NetChange::TailnetGone { reason, message } => {
            return (Some(ended(update.revision, *reason, message.clone())), true);
        }
        _ => {}
    }
    let delta = view.apply(&update.change);
    if delta.is_empty() {
        return (None, false);
    }
    let hub = cp.hub();
    let nodes = |list: &[Arc<Node>]| list.iter().filter(|n| !n.gateway).map(|n| convert::node(n, hub)).collect();
    let gateway_id = view.gateway_id();
    let message = pb::NetMapDelta {
        peers_added: nodes(&delta.added),
        peers_updated: nodes(&delta.updated),
        peers_removed: delta.removed.iter().filter(|id| Some(**id) != gateway_id).map(ToString::to_string).collect(),
        self_: delta.me.as_ref().map(|n| convert::node(n, hub)),
        filter: delta
            .filter_changed
            .then(|| convert::packet_filter(view.filter().as_deref(), Ipv6Map::of(view.me().tailnet_id))),
        gateway: delta.added.iter().chain(&delta.updated).find(|n| n.gateway).map(|n| convert::node(n, hub)),
        gateway_removed: gateway_id.is_some_and(|g| delta.removed.contains(&g)),
        paths: None,
    };
    (Some(pb::NetMap { revision: update.revision, update: Some(pb::net_map::Update::Delta(message)) }), false)
}

/// The netmap messages for `node` (a full map, or a delta from `since` when it resumes, then changes,
/// then why it ended), as the node's `WatchNetMap` stream sends them and as the server's own gateways
/// receive them (`since` 0).
pub(crate) async fn netmap_feed(
    cp: &Arc<ControlPlane>,
    node: crate::model::Node,
    since: u64,
) -> Result<mpsc::Receiver<Result<pb::NetMap, Status>>, Error> {
    let mut shutdown = cp.shutdown_signal();
    if *shutdown.borrow() {
        return Err(Error::Unavailable("server shutting down; reconnect shortly".into()));
    }
    // Subscribe before the snapshot: a change lands either in the snapshot or on the channel.
    let mut changes = cp.hub().subscribe_tailnet(node.tailnet_id);
    let (mut view, mut tailnet, mut revision) = load_view(cp, node.id).await?;
    // What the first map shows must be durable: nothing a crash could take back.
    cp.flush().await?;
    let presence = cp.connect(&node);
    let cp = cp.clone();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _presence = presence;
        let me = node.id;
        let first = match resumed(&view, revision, since, &cp).await {
            Some(delta) => delta,
            None => full(&view, &tailnet, revision, &cp),
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            let (message, last) = tokio::select! {
                _ = crate::control_plane::stopped(&mut shutdown) => {
                    (Some(ended(revision, EndReason::ServerShutdown, "server shutting down; reconnect".into())), true)
                }
                _ = tx.closed() => return,
                update = changes.recv() => match update {
                    Ok(update) if update.revision <= revision => (None, false),
                    Ok(update) if !matches!(update.change, NetChange::Resync) => {
                        revision = update.revision;
                        translate(&mut view, &update, &cp)
                    }
                    resync @ (Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {
                        tracing::debug!(node = %me, lagged = resync.is_err(), "netmap watcher missed changes; resending the full map");
                        if resync.is_err() {
                            changes = changes.resubscribe();
                        }
                        match load_view(&cp, me).await {
                            Ok(loaded) => {
                                (view, tailnet, revision) = loaded;
                                (Some(full(&view, &tailnet, revision, &cp)), false)
                            }
                            Err(Error::NotFound { .. }) => {
                                (Some(ended(revision, EndReason::NodeRemoved, "node removed".into())), true)
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        (Some(ended(revision, EndReason::TailnetDeleted, "tailnet deleted".into())), true)
                    }
                },
            };
            if let Some(message) = message
                && tx.send(Ok(message)).await.is_err()
            {
                return;
            }
            if last {
                return;
            }
        }
    });
    Ok(rx)
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let reg = convert::registration(req.into_inner())?;
        let (node, tailnet, session) = self.cp.register(reg).await?;
        Ok(Response::new(pb::RegisterResponse {
            node: Some(convert::node(&node, self.cp.hub())),
            session_token: session.into_exposed(),
            tailnet: Some(convert::tailnet(&tailnet)),
        }))
    }

    type WatchNetMapStream = BoxStream<pb::NetMap>;

    async fn watch_net_map(
        &self,
        req: Request<pb::WatchNetMapRequest>,
    ) -> Result<Response<Self::WatchNetMapStream>, Status> {
        let node = self.cp.authenticate_session(&req.get_ref().session_token).await?;
        let since = req.get_ref().since_revision;
        let rx = netmap_feed(&self.cp, node, since).await?;
        let open = self.cp.metrics.watch_stream("netmap");
        let stream = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |m| {
            let _counted = &open;
            m
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_endpoints(
        &self,
        req: Request<pb::ReportEndpointsRequest>,
    ) -> Result<Response<pb::ReportEndpointsResponse>, Status> {
        let req = req.into_inner();
        let node = self.cp.authenticate_session(&req.session_token).await?;
        let endpoints = crate::validate::endpoints("endpoints", &req.endpoints)?;
        self.cp.set_endpoints(node.id, endpoints).await?;
        Ok(Response::new(pb::ReportEndpointsResponse {}))
    }

    type RelayStream = BoxStream<pb::RelayPacket>;

    async fn relay(
        &self,
        req: Request<tonic::Streaming<pb::RelayPacket>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let token = super::bearer(&req).unwrap_or_default().to_string();
        let batches = req.metadata().get(pb::RELAY_BATCH_HEADER).is_some_and(|v| v == "1");
        let node = self.cp.authenticate_session(&token).await.map_err(|e| match e {
            Error::Unauthenticated(m) => {
                Status::unauthenticated(format!("{m} (send the session token as 'authorization: Bearer')"))
            }
            other => other.into(),
        })?;
        let mut inbound = req.into_inner();
        let cp = self.cp.clone();
        let (tailnet, me) = (node.tailnet_id, node.wireguard_public_key);
        // Why the stream ends, from the task that reads it: the outbound half ends with it.
        let (end, ended) = oneshot::channel::<Option<Status>>();
        let mailbox = crate::relay::Mailbox::new();
        let outbound = relay_outbound(mailbox.clone(), ended, batches);
        let open = cp.metrics.watch_stream("relay");
        tokio::spawn(async move {
            let _counted = open;
            let _registration = cp.relays.open(tailnet, me, mailbox);
            let _home = cp.relay_home(tailnet, me).await;
            // The stream ends when the node or its tailnet goes: a removed node relays nothing more.
            let mut changes = cp.hub().subscribe_tailnet(tailnet);
            let mut shutdown = cp.shutdown_signal();
            let mut limiter = crate::relay::Limiter::default();
            let mut end = end;
            loop {
                tokio::select! {
                    _ = crate::control_plane::stopped(&mut shutdown) => return,
                    _ = end.closed() => return,
                    frame = inbound.message() => match frame {
                        Ok(Some(packet)) => {
                            if !packet.peer_key.is_empty() || packet.frames.is_empty() {
                                cp.relay_frame(tailnet, me, &packet.peer_key, packet.data, &mut limiter).await;
                            }
                            for f in packet.frames {
                                cp.relay_frame(tailnet, me, &f.peer_key, f.data, &mut limiter).await;
                            }
                        }
                        Ok(None) => return,
                        Err(status) => {
                            // Say why instead of ending the stream as if all were well (a message over
                            // the size limit, say); the node reconnects.
                            tracing::info!(node = %node.id, error = %status.message(), "relay stream ended by a bad message");
                            let reason = format!("relay stream ended: {}", status.message());
                            let _ = end.send(Some(Status::new(status.code(), reason)));
                            return;
                        }
                    },
                    change = changes.recv() => match change {
                        Ok(update) => match &update.change {
                            NetChange::PeerRemoved { node: gone, .. } if *gone == node.id => return,
                            NetChange::TailnetGone { .. } => return,
                            NetChange::Resync if cp.get_node(node.id).await.is_err() => return,
                            _ => {}
                        },
                        Err(broadcast::error::RecvError::Closed) => return,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            if cp.get_node(node.id).await.is_err() {
                                return;
                            }
                        }
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let node = self.cp.authenticate_session(&req.get_ref().session_token).await?;
        self.cp.remove_node(node.id, EndReason::NodeRemoved, "node left", "", &Actor::node(node.id)).await?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn start_login(
        &self,
        req: Request<pb::StartLoginRequest>,
    ) -> Result<Response<pb::StartLoginResponse>, Status> {
        let request = convert::login_request(req.into_inner())?;
        let started = self.cp.start_login(request).await?;
        Ok(Response::new(pb::StartLoginResponse {
            login_id: started.login_id.into_exposed(),
            verification_uri: started.verification_uri,
            user_code: started.user_code,
            verification_uri_complete: started.verification_uri_complete.unwrap_or_default(),
            expires_at: Some(crate::time::to_timestamp(started.expires_at)),
            provider: started.provider,
            issuer: started.issuer,
        }))
    }

    async fn wait_login(&self, req: Request<pb::WaitLoginRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let login_id = req.into_inner().login_id;
        if login_id.is_empty() || login_id.len() > 128 {
            return Err(Error::invalid("login_id", "is required (from StartLogin)").into());
        }
        let (node, tailnet, session) = self.cp.wait_login(&login_id).await?;
        Ok(Response::new(pb::RegisterResponse {
            node: Some(convert::node(&node, self.cp.hub())),
            session_token: session.into_exposed(),
            tailnet: Some(convert::tailnet(&tailnet)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::relay::Mailbox;

    fn frame(mailbox: &Mailbox, from: u8, len: usize) {
        mailbox.push([from; 32], vec![from; len]);
    }

    #[tokio::test]
    async fn the_relay_stream_takes_its_frames_from_the_mailbox_in_batches_or_one_by_one() {
        let mailbox = Mailbox::new();
        let (_end, ended) = oneshot::channel();
        let mut batched = Box::pin(relay_outbound(mailbox.clone(), ended, true));
        for i in 1..=3 {
            frame(&mailbox, i, 100);
        }
        let packet = batched.next().await.unwrap().unwrap();
        assert_eq!(packet.frames.len(), 3, "all that waited, in one message");
        assert_eq!(packet.frames[2].peer_key, vec![3; 32]);
        assert!(packet.peer_key.is_empty());

        // Waiting for a frame, the stream is woken by it (HTTP/2 polls it from its own task).
        let waiting = tokio::spawn(async move { batched.next().await });
        tokio::task::yield_now().await;
        frame(&mailbox, 4, 40);
        let packet = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("woken").unwrap();
        assert_eq!(packet.unwrap().unwrap().frames[0].data.len(), 40);

        let mailbox = Mailbox::new();
        let (_end, ended) = oneshot::channel();
        let mut single = Box::pin(relay_outbound(mailbox.clone(), ended, false));
        frame(&mailbox, 1, 10);
        frame(&mailbox, 2, 20);
        for i in 1..=2u8 {
            let packet = single.next().await.unwrap().unwrap();
            assert!(packet.frames.is_empty(), "an older client gets one frame per message");
            assert_eq!((packet.peer_key, packet.data.len()), (vec![i; 32], usize::from(i) * 10));
        }
    }

    #[tokio::test]
    async fn the_relay_stream_ends_with_its_reader_and_says_why() {
        let mailbox = Mailbox::new();
        let (end, ended) = oneshot::channel();
        let mut stream = Box::pin(relay_outbound(mailbox.clone(), ended, true));
        // A wakeup whose frames an earlier round took yields nothing.
        mailbox.ready.notify_one();
        assert!(futures::FutureExt::now_or_never(stream.next()).is_none(), "no empty message");
        end.send(Some(Status::invalid_argument("too big"))).unwrap();
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.message(), "too big");
        assert!(stream.next().await.is_none());

        let (end, ended) = oneshot::channel::<Option<Status>>();
        let mut stream = Box::pin(relay_outbound(Mailbox::new(), ended, true));
        drop(end);
        assert!(stream.next().await.is_none(), "a reader that stops ends the stream cleanly");
    }
}
