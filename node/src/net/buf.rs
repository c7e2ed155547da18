//! Recycled buffers for large frames.
//!
//! A chunk frame used to be read into a fresh allocation that grew as its bytes arrived,
//! zeroed ahead of them, and was freed once the chunk was written. On the 1 GiB transfer
//! benchmark the receiver then spent 41% of its samples in the kernel's copy into the
//! page cache, from buffers whose pages were new to it (a user-space test on the same
//! machine: `pwrite` of 1 MiB from a fresh mapping costs 3-4x one from a reused buffer,
//! before counting the faults and zeroing). Frames of [`POOLED_MIN`] bytes or more are
//! now read into buffers that come back to a [`BufPool`] when the frame is dropped, and
//! the uploader reads each chunk it sends into one from the same pool: their pages stay
//! mapped and initialised, so they are neither faulted in nor zeroed again.
//!
//! The pool is bounded in bytes ([`POOL_BYTES`]) for the whole node; what readers hold at
//! once stays bounded by the frame budget, which a pooled buffer does not bypass (a reader
//! still takes budget as the frame's bytes arrive), and what uploads hold by the upload
//! slots.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// Frames at least this long are read into pooled buffers.
pub const POOLED_MIN: usize = 64 << 10;
/// Bytes (of capacity) the pool keeps idle: 32 buffers of 1 MiB chunk frames, two of the
/// largest (16 MiB) ones.
pub const POOL_BYTES: usize = 32 << 20;

/// Idle buffers, every byte of each initialised (`len() == capacity()` is not required,
/// but only the first `len()` bytes are reused without zeroing).
#[derive(Debug, Default)]
pub struct BufPool {
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    /// An empty pool.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A buffer for a frame of `len` bytes: an idle one of capacity `len` to `2 len` if
    /// there is one (its initialised bytes kept), else an empty one with capacity `len`
    /// reserved (address space only until written).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |b: &Vec<u8>| b.capacity() >= len && b.capacity() <= len.saturating_mul(2);
        if let Some(i) = idle.bufs.iter().rposition(fits) {
            let b = idle.bufs.swap_remove(i);
            idle.bytes -= b.capacity();
            return b;
        }
        drop(idle);
        Vec::with_capacity(len)
    }

    /// Keep `buf` for a later frame, unless it is small or the pool is full.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.len() < POOLED_MIN {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.bytes + buf.capacity() > POOL_BYTES {
            return;
        }
        idle.bytes += buf.capacity();
        idle.bufs.push(buf);
    }

    /// Bytes of capacity held idle.
    pub fn idle_bytes(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

/// A frame's bytes: the first `len` bytes of a buffer that goes back to its pool (if it
/// came from one) when dropped.
pub struct FrameBuf {
    data: Vec<u8>,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl FrameBuf {
    /// The first `len` bytes of `data` (`len <= data.len()`), returned to `pool` on drop.
    pub fn new(data: Vec<u8>, len: usize, pool: Option<Arc<BufPool>>) -> Self {
        assert!(
            len <= data.len(),
            "frame of {len} bytes in a buffer of {}",
            data.len()
        );
        FrameBuf { data, len, pool }
    }
}

impl From<Vec<u8>> for FrameBuf {
    fn from(data: Vec<u8>) -> Self {
        let len = data.len();
        FrameBuf {
            data,
            len,
            pool: None,
        }
    }
}

impl Deref for FrameBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.data));
        }
    }
}

impl fmt::Debug for FrameBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameBuf")
            .field("len", &self.len)
            .field("pooled", &self.pool.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_are_reused_within_twice_the_size() {
        let pool = BufPool::new();
        let a = pool.take(1 << 20);
        assert!(a.is_empty() && a.capacity() >= 1 << 20);
        drop(FrameBuf::new(vec![7; 1 << 20], 1 << 20, Some(pool.clone())));
        assert_eq!(pool.idle_bytes(), 1 << 20);
        // Too large for a 256 KiB frame: it stays idle.
        assert!(pool.take(256 << 10).is_empty());
        assert_eq!(pool.idle_bytes(), 1 << 20);
        // Right for a frame of 600 KiB to 1 MiB: its initialised bytes come with it.
        let b = pool.take(600 << 10);
        assert_eq!(b.len(), 1 << 20);
        assert!(b.iter().all(|&x| x == 7));
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn the_pool_keeps_at_most_its_bytes_and_no_small_buffers() {
        let pool = BufPool::new();
        for _ in 0..40 {
            drop(FrameBuf::new(vec![0; 1 << 20], 1 << 20, Some(pool.clone())));
        }
        assert_eq!(pool.idle_bytes(), POOL_BYTES);
        let small = BufPool::new();
        drop(FrameBuf::new(vec![0; 1024], 1024, Some(small.clone())));
        assert_eq!(small.idle_bytes(), 0);
        // A frame shorter than its buffer shows only its own bytes.
        let f = FrameBuf::new(vec![1, 2, 3, 4], 2, None);
        assert_eq!(&*f, &[1, 2]);
    }
}
