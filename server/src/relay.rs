//! The relay: WireGuard datagrams between two live nodes of one tailnet, through the server, for when
//! no direct path works. Frames are opaque (still encrypted end to end). Each node has a bounded mailbox
//! that drops its oldest frame when full, so one stalled reader never blocks anyone else; each sender has
//! a rate limit. Everything dropped is counted by reason.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::model::TailnetId;

/// A WireGuard datagram is at most this big.
pub const MAX_FRAME: usize = 65_535;
/// Frames a mailbox holds before it drops the oldest.
const MAILBOX: usize = 1024;
/// Per-sender budget: bytes per second, with a burst of one second's worth.
const RATE_BYTES: f64 = 256.0 * 1024.0 * 1024.0;

pub type Key = [u8; 32];

/// What the relay has done, for metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded_frames: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub dropped_unknown_peer: AtomicU64,
    pub dropped_oversize: AtomicU64,
    pub dropped_rate: AtomicU64,
    pub dropped_overflow: AtomicU64,
}

/// A snapshot of [`RelayStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayCounts {
    pub forwarded_frames: u64,
    pub forwarded_bytes: u64,
    pub dropped_unknown_peer: u64,
    pub dropped_oversize: u64,
    pub dropped_rate: u64,
    pub dropped_overflow: u64,
}

/// Frames waiting for one node's relay stream.
pub struct Mailbox {
    frames: Mutex<VecDeque<(Key, Vec<u8>)>>,
    pub ready: Notify,
}

impl Mailbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Mailbox { frames: Mutex::default(), ready: Notify::new() })
    }

    /// Queues one frame (dropping the oldest when full) and wakes the stream.
    pub fn push(&self, from: Key, data: Vec<u8>) -> bool {
        let overflow = {
            let mut frames = self.frames.lock().unwrap();
            let overflow = frames.len() >= MAILBOX && frames.pop_front().is_some();
            frames.push_back((from, data));
            overflow
        };
        self.ready.notify_one();
        !overflow
    }

    /// Takes up to `max` frames and about `max_bytes` (at least one frame); if more wait, `ready`
    /// stays signalled for the next round.
    pub fn take(&self, max: usize, max_bytes: usize) -> Vec<(Key, Vec<u8>)> {
        let mut frames = self.frames.lock().unwrap();
        let (mut n, mut bytes) = (0, 0);
        while n < frames.len().min(max) && (n == 0 || bytes + frames[n].1.len() <= max_bytes) {
            bytes += frames[n].1.len();
            n += 1;
        }
        let taken = frames.drain(..n).collect();
        if !frames.is_empty() {
            self.ready.notify_one();
        }
        taken
    }
}

/// A sender's token bucket.
pub struct Limiter {
    tokens: f64,
    at: Instant,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter { tokens: RATE_BYTES, at: Instant::now() }
    }
}

impl Limiter {
    fn admit(&mut self, bytes: usize) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * RATE_BYTES).min(RATE_BYTES);
        self.at = now;
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
pub struct Relays {
    mailboxes: Mutex<HashMap<(TailnetId, Key), Arc<Mailbox>>>,
    pub stats: RelayStats,
}

/// Removes a node's mailbox when its relay stream ends (unless a newer stream replaced it).
pub struct Registration<'a> {
    relays: &'a Relays,
    key: (TailnetId, Key),
    mailbox: Arc<Mailbox>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut boxes = self.relays.mailboxes.lock().unwrap();
        if boxes.get(&self.key).is_some_and(|m| Arc::ptr_eq(m, &self.mailbox)) {
            boxes.remove(&self.key);
        }
    }
}

impl Relays {
    /// Opens `key`'s mailbox in `tailnet` (replacing an older stream's).
    pub fn register(&self, tailnet: TailnetId, key: Key) -> (Arc<Mailbox>, Registration<'_>) {
        let mailbox = Mailbox::new();
        (mailbox.clone(), self.open(tailnet, key, mailbox))
    }

    /// Opens `key`'s mailbox in `tailnet` with a mailbox made beforehand.
    pub fn open(&self, tailnet: TailnetId, key: Key, mailbox: Arc<Mailbox>) -> Registration<'_> {
        self.mailboxes.lock().unwrap().insert((tailnet, key), mailbox.clone());
        Registration { relays: self, key: (tailnet, key), mailbox }
    }

    /// Forwards one frame from `from` to `to`, both of `tailnet`, when `to`'s stream is on this server;
    /// drops and counts anything malformed or over the sender's rate. A frame for a key with no stream here
    /// comes back (uncounted) for the caller to send to another replica or to drop.
    pub fn forward(
        &self,
        tailnet: TailnetId,
        from: Key,
        to: &[u8],
        data: Vec<u8>,
        limiter: &mut Limiter,
    ) -> Result<(), Option<(Key, Vec<u8>)>> {
        let stats = &self.stats;
        if data.len() > MAX_FRAME {
            stats.dropped_oversize.fetch_add(1, Ordering::Relaxed);
            return Err(None);
        }
        let Ok(to) = <Key>::try_from(to) else {
            stats.dropped_unknown_peer.fetch_add(1, Ordering::Relaxed);
            return Err(None);
        };
        if !limiter.admit(data.len()) {
            stats.dropped_rate.fetch_add(1, Ordering::Relaxed);
            return Err(None);
        }
        self.deliver(tailnet, from, to, data).map_err(|data| Some((to, data)))
    }

    /// Counts a frame sent on to the replica that holds its receiver's stream.
    pub fn forwarded_elsewhere(&self, bytes: usize) {
        self.stats.forwarded_frames.fetch_add(1, Ordering::Relaxed);
        self.stats.forwarded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a frame nobody could take.
    pub fn dropped_unknown(&self) {
        self.stats.dropped_unknown_peer.fetch_add(1, Ordering::Relaxed);
    }

    /// Puts a frame in `to`'s mailbox on this server; gives it back if `to` has no stream here.
    pub fn deliver(&self, tailnet: TailnetId, from: Key, to: Key, data: Vec<u8>) -> Result<(), Vec<u8>> {
        let stats = &self.stats;
        let Some(mailbox) = self.mailboxes.lock().unwrap().get(&(tailnet, to)).cloned() else {
            return Err(data);
        };
        let bytes = data.len() as u64;
        if !mailbox.push(from, data) {
            stats.dropped_overflow.fetch_add(1, Ordering::Relaxed);
        }
        stats.forwarded_frames.fetch_add(1, Ordering::Relaxed);
        stats.forwarded_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    pub fn counts(&self) -> RelayCounts {
        let s = &self.stats;
        RelayCounts {
            forwarded_frames: s.forwarded_frames.load(Ordering::Relaxed),
            forwarded_bytes: s.forwarded_bytes.load(Ordering::Relaxed),
            dropped_unknown_peer: s.dropped_unknown_peer.load(Ordering::Relaxed),
            dropped_oversize: s.dropped_oversize.load(Ordering::Relaxed),
            dropped_rate: s.dropped_rate.load(Ordering::Relaxed),
            dropped_overflow: s.dropped_overflow.load(Ordering::Relaxed),
        }
    }
}
