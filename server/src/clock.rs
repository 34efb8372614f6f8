//! Wall-clock time read through tokio's clock, so that paused-time tests move it too.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// The server's one source of "now". It maps tokio's monotonic clock onto wall-clock time taken once
/// at start, so deadlines stored as wall-clock times can be slept on, and `tokio::time::pause()` drives
/// every expiry in tests without real waiting.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_base: SystemTime,
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock { wall_base: SystemTime::now(), base: Instant::now() }
    }

    pub fn now(&self) -> SystemTime {
        self.wall_base + self.base.elapsed()
    }

    /// The tokio instant at which wall-clock time `t` is reached (now, if it has passed).
    pub fn instant_at(&self, t: SystemTime) -> Instant {
        let offset = t.duration_since(self.wall_base).unwrap_or(Duration::ZERO);
        (self.base + offset).max(Instant::now())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
