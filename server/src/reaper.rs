//! The reaper: one task that sleeps until the next deadline (tailnet TTL, node expiry, idle ephemeral
//! node, policy proposal expiry, a person's login) and acts on it at that second, instead of sweeping on an interval.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

use crate::clock::Clock;
use crate::control_plane::ControlPlane;
use crate::error::Error;
use crate::model::{NodeId, ProposalId, TailnetId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deadline {
    TailnetTtl(TailnetId),
    NodeExpiry(NodeId),
    EphemeralIdle(NodeId),
    ProposalExpiry(ProposalId),
    /// A person's login on this node ends.
    LoginExpiry(NodeId),
}

/// Schedules deadlines. Each is re-checked against the store when it fires, so a stale one is harmless.
#[derive(Clone, Debug)]
pub struct Reaper {
    tx: mpsc::UnboundedSender<(SystemTime, Deadline)>,
}

pub type ReaperQueue = mpsc::UnboundedReceiver<(SystemTime, Deadline)>;

impl Reaper {
    pub fn channel() -> (Reaper, ReaperQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Reaper { tx }, rx)
    }

    pub fn schedule(&self, at: SystemTime, what: Deadline) {
        // The task is gone only during shutdown, when nothing needs reaping.
        let _ = self.tx.send((at, what));
    }
}

pub fn spawn(
    owner: &ControlPlane,
    cp: Weak<ControlPlane>,
    mut rx: ReaperQueue,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    owner.spawn(async move {
        let mut queue: BTreeSet<(SystemTime, Deadline)> = BTreeSet::new();
        loop {
            let next = queue.first().map(|(at, _)| clock.instant_at(*at));
            tokio::select! {
                scheduled = rx.recv() => match scheduled {
                    Some(item) => { queue.insert(item); }
                    None => return,
                },
                _ = async { tokio::time::sleep_until(next.expect("guarded")).await }, if next.is_some() => {
                    let Some(cp) = cp.upgrade() else { return };
                    let now = clock.now();
                    while let Some(&(at, what)) = queue.first() {
                        if at > now {
                            break;
                        }
                        queue.pop_first();
                        if !fire(&cp, what).await {
                            // A storage failure: try again shortly rather than forget the deadline.
                            queue.insert((now + std::time::Duration::from_secs(5), what));
                        }
                    }
                }
                _ = crate::control_plane::stopped(&mut shutdown) => return,
            }
        }
    });
}

/// Acts on a deadline; false when it should be retried.
async fn fire(cp: &ControlPlane, what: Deadline) -> bool {
    let result = match what {
        Deadline::TailnetTtl(id) => cp.expire_tailnet(id).await,
        Deadline::NodeExpiry(id) => cp.expire_node(id).await,
        Deadline::EphemeralIdle(id) => cp.reap_idle_ephemeral(id).await,
        Deadline::ProposalExpiry(id) => cp.expire_proposal(id).await,
        Deadline::LoginExpiry(id) => cp.expire_login(id).await,
    };
    match result {
        Ok(()) | Err(Error::NotFound { .. }) => true,
        Err(e) => {
            tracing::warn!(deadline = ?what, error = %e, "reaper could not act on a deadline; retrying in 5 s");
            false
        }
    }
}
