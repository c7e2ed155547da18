//! [`Bitfield`]: which chunks of a file a node holds (wire messages, the core's
//! availability counts and the node's store all use it).

use serde::{Deserialize, Serialize};

/// A compact set of chunk indices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitfield {
    len: u32,
    bits: Vec<u8>,
}

impl Bitfield {
    /// All clear, `len` bits.
    pub fn new(len: u32) -> Self {
        Bitfield {
            len,
            bits: vec![0; (len as usize).div_ceil(8)],
        }
    }

    /// All set, `len` bits.
    pub fn full(len: u32) -> Self {
        let mut b = Bitfield::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// No bits?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Is bit `i` set? False past the end.
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Set bit `i`; ignored past the end.
    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    /// A copy with `len` bits: bits past the new end are dropped, new bits are clear.
    pub fn resized(&self, len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in 0..len.min(self.len) {
            if self.get(i) {
                b.set(i);
            }
        }
        b
    }

    /// The bits as bytes, bit `i` in byte `i / 8` at position `i % 8` (bits past `len`
    /// are clear).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Number of set bits.
    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    /// Well-formed: byte length matches and no bits past `len`.
    pub fn is_valid(&self) -> bool {
        if self.bits.len() != (self.len as usize).div_ceil(8) {
            return false;
        }
        let tail = self.len % 8;
        tail == 0 || self.bits.last().is_none_or(|b| b >> tail == 0)
    }
}
