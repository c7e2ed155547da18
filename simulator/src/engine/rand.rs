//! The engine's random draws. Every one takes the RNG it draws from, so the order of
//! draws (and with it the whole run) is visible at the call site.

use pollen_protocol::SigningKey;
use rand_chacha::ChaCha8Rng;
use rand_core::Rng;

/// An exponentially distributed duration with mean `mean` (at least 1).
pub(super) fn exp(rng: &mut ChaCha8Rng, mean: u64) -> u64 {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (-(1.0 - u).ln() * mean as f64).max(1.0) as u64
}

/// An index below `n`.
pub(super) fn pick(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// True with probability `p` (no draw at all when `p` is 0 or less).
pub(super) fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    p > 0.0 && ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
}

/// A signing key from 32 bytes of `rng`.
pub(super) fn key_from(rng: &mut ChaCha8Rng) -> SigningKey {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    SigningKey::from_bytes(&b)
}
