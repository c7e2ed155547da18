//! The link model: latency and jitter, the same for every link, and the cut set.

use super::Harness;
use core::time::Duration;
use rand_core::Rng;

/// Link properties, the same for every link.
#[derive(Clone, Copy, Debug)]
pub struct LinkModel {
    /// One-way latency.
    pub latency: Duration,
    /// Extra random delay in [0, jitter) per message (reorders messages).
    pub jitter: Duration,
    /// Upload bandwidth of each node, bytes per second (chunks queue on the uplink).
    pub upload_bytes_per_sec: u64,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel {
            latency: Duration::from_millis(5),
            jitter: Duration::from_millis(3),
            upload_bytes_per_sec: 10 * 1024 * 1024,
        }
    }
}

impl Harness {
    pub(super) fn delay(&mut self) -> Duration {
        let j = self.link.jitter.as_micros() as u64;
        let extra = if j == 0 { 0 } else { self.rng.next_u64() % j };
        self.link.latency + Duration::from_micros(extra)
    }

    pub(super) fn linked(&self, a: usize, b: usize) -> bool {
        !self.cut.contains(&a) && !self.cut.contains(&b)
    }
}
