//! [`Bitfield`]: which chunks of a file a node holds (wire messages, the core's
//! availability counts and the node's store all use it).

use serde::{Deserialize, Serialize};

/// A compact set of chunk indices.
///
/// On the wire it is `len` then `bits` (the derive's form); `ones`, the number of bits
/// set, is kept with every change and recomputed when one is decoded, because the
/// scheduler asks every peer's count on every pass (5% of the simulator's time went to
/// counting them again).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Wire")]
pub struct Bitfield {
    len: u32,
    bits: Vec<u8>,
    #[serde(skip)]
    ones: u32,
}

/// The encoded form of a [`Bitfield`].
#[derive(Deserialize)]
#[serde(rename = "Bitfield")]
struct Wire {
    len: u32,
    bits: Vec<u8>,
}

impl From<Wire> for Bitfield {
    fn from(w: Wire) -> Self {
        let ones = w.bits.iter().map(|b| b.count_ones()).sum();
        Bitfield {
            len: w.len,
            bits: w.bits,
            ones,
        }
    }
}

impl Bitfield {
    /// All clear, `len` bits.
    pub fn new(len: u32) -> Self {
        Bitfield {
            len,
            bits: vec![0; (len as usize).div_ceil(8)],
            ones: 0,
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
            let b = &mut self.bits[(i / 8) as usize];
            self.ones += u32::from(*b & (1 << (i % 8)) == 0);
            *b |= 1 << (i % 8);
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
        self.ones
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

#[cfg(test)]
mod tests {
    use super::Bitfield;

    #[test]
    fn the_count_follows_every_change_and_the_wire_form_is_len_then_bits() {
        let mut b = Bitfield::new(20);
        for i in [3, 3, 7, 19, 25] {
            b.set(i);
        }
        assert_eq!(
            b.count(),
            3,
            "a bit set twice counts once; past the end, not at all"
        );
        assert_eq!(Bitfield::full(13).count(), 13);
        assert_eq!(b.resized(8).count(), 2);
        // The encoding is the derive's: len, then the bytes; decoding counts again.
        let bytes = postcard::to_allocvec(&b).expect("encode");
        let plain = postcard::to_allocvec(&(20u32, b.as_bytes().to_vec())).expect("encode");
        assert_eq!(bytes, plain);
        let back: Bitfield = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!((back.count(), &back), (3, &b));
    }
}
