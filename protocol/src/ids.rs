//! Identifiers: node ids (ed25519 public keys), content ids and manifest ids (BLAKE3),
//! and channel names.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Serialize};

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// Parse 64 hex digits into 32 bytes.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// 32 bytes as four big-endian words (their order is the bytes' order).
#[inline]
fn words(b: &[u8; 32]) -> [u64; 4] {
    let (w, _) = b.as_chunks::<8>();
    [0, 1, 2, 3].map(|i| u64::from_be_bytes(w[i]))
}

macro_rules! id32 {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Eq, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        // Compared as four big-endian words: the bytes' lexicographic order, without a
        // call to memcmp per comparison (17% of the simulator's time at 10k nodes went
        // to these in the core's binary searches and maps).
        impl PartialEq for $name {
            fn eq(&self, o: &Self) -> bool {
                words(&self.0) == words(&o.0)
            }
        }

        // As derived: the bytes (equal ids, equal hashes).
        impl core::hash::Hash for $name {
            fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state)
            }
        }

        impl Ord for $name {
            fn cmp(&self, o: &Self) -> core::cmp::Ordering {
                words(&self.0).cmp(&words(&o.0))
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, o: &Self) -> Option<core::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }

        impl $name {
            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lowercase hex, 64 digits.
            pub fn to_hex(&self) -> String {
                self.to_string()
            }
            /// The first 8 hex digits, for logs and tables.
            pub fn short(&self) -> String {
                let mut s = self.to_string();
                s.truncate(8);
                s
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = InvalidHex;
            fn from_str(s: &str) -> Result<Self, InvalidHex> {
                parse_hex32(s).map($name).ok_or(InvalidHex)
            }
        }
    };
}

/// The input was not 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected 64 hex digits")]
pub struct InvalidHex;

id32!(
    /// A node's id: its 32-byte ed25519 public key, the same key as its libp2p identity.
    NodeId
);
id32!(
    /// A file's content id: the BLAKE3 hash of the whole file (what `b3sum` prints).
    ContentId
);
id32!(
    /// A manifest's id: the BLAKE3 hash of its signed body bytes.
    ManifestId
);
id32!(
    /// An ed25519 public key of an operator (root, publisher or fleet key).
    PublicKey
);

impl From<NodeId> for PublicKey {
    fn from(n: NodeId) -> Self {
        PublicKey(n.0)
    }
}

impl From<&ed25519_dalek::VerifyingKey> for PublicKey {
    fn from(k: &ed25519_dalek::VerifyingKey) -> Self {
        PublicKey(k.to_bytes())
    }
}

impl From<&ed25519_dalek::SigningKey> for PublicKey {
    fn from(k: &ed25519_dalek::SigningKey) -> Self {
        PublicKey::from(&k.verifying_key())
    }
}

impl From<&ed25519_dalek::VerifyingKey> for NodeId {
    fn from(k: &ed25519_dalek::VerifyingKey) -> Self {
        NodeId(k.to_bytes())
    }
}

/// A node's id is its ed25519 public key.
impl From<&ed25519_dalek::SigningKey> for NodeId {
    fn from(k: &ed25519_dalek::SigningKey) -> Self {
        NodeId::from(&k.verifying_key())
    }
}

/// Longest channel name.
pub const MAX_CHANNEL_LEN: usize = 64;

/// A channel name: 1 to 64 of lowercase ASCII letters, digits, `.`, `_` and `-`, starting
/// with a letter or digit (valid as a model name in every serving client).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Channel(String);

impl Channel {
    /// Validate a channel name.
    pub fn new(s: &str) -> Result<Self, String> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        if s.is_empty() || s.len() > MAX_CHANNEL_LEN {
            return Err(format!(
                "channel name must be 1 to {MAX_CHANNEL_LEN} characters"
            ));
        }
        if !s.chars().all(ok_char) {
            return Err(format!(
                "channel name {s:?} may only hold lowercase letters, digits, '.', '_' and '-'"
            ));
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "channel name {s:?} must start with a letter or digit"
            ));
        }
        Ok(Channel(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Channel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Channel::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_as_their_bytes() {
        // Pairs that differ in one byte at every position, both ways, and equal ones.
        let base = [0x5au8; 32];
        for i in 0..32 {
            for delta in [1u8, 0x80] {
                let mut b = base;
                b[i] = b[i].wrapping_add(delta);
                let (x, y) = (ContentId(base), ContentId(b));
                assert_eq!(x.cmp(&y), base.cmp(&b), "byte {i} + {delta}");
                assert_eq!(y.cmp(&x), b.cmp(&base));
                assert_eq!(x == y, base == b);
            }
        }
        assert_eq!(ContentId(base), ContentId(base));
        assert_eq!(
            ContentId(base).cmp(&ContentId(base)),
            core::cmp::Ordering::Equal
        );
    }
}
