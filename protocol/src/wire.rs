//! The wire format: length-prefixed frames of one kind byte plus a postcard payload.
//!
//! ```text
//! frame  = length:u32 (big endian, counts kind + payload) kind:u8 payload
//! ```
//!
//! Control frames (every kind but [`KIND_CHUNK`]) are capped at [`MAX_CONTROL_FRAME`] bytes;
//! chunk frames at a small header plus the largest chunk size. A kind this version does not
//! know decodes to [`Message::Unknown`] and is ignored, so newer peers can add messages.
//! Decoding untrusted bytes returns an error and never panics; postcard preallocates at most
//! what serde's cautious size hints allow, so decoding allocates a small multiple of the
//! frame at most.

pub use crate::bitfield::Bitfield;
use crate::chunking::MAX_CHUNK_SIZE;
use crate::ids::{ContentId, ManifestId};
use crate::manifest::{Channel, SignedManifest};
use crate::rollout::{HealthReport, SignedInstruction};
use crate::signing::decode_canonical;
use crate::trust::{SignedNodeCert, SignedTrustRoot};
use serde::{Deserialize, Serialize};

/// libp2p protocol id of this wire version.
pub const PROTOCOL_ID: &str = "/pollen/1";
/// Largest control frame (kind + payload): holds the manifest of a 32 GiB artifact at 1 MiB
/// chunks.
pub const MAX_CONTROL_FRAME: usize = 1 << 20;
/// Largest chunk-frame header.
pub const MAX_CHUNK_HEADER: usize = 128;
/// Largest chunk frame.
pub const MAX_CHUNK_FRAME: usize = 1 + MAX_CHUNK_HEADER + MAX_CHUNK_SIZE as usize;
/// Most items in one list-carrying message.
pub const MAX_LIST: usize = 4096;

/// Kind byte of a chunk data frame.
pub const KIND_CHUNK: u8 = 0x20;

/// An object that gossip names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ObjectId {
    /// A manifest by id.
    Manifest(ManifestId),
    /// The trust root of a version.
    TrustRoot(u64),
    /// An instruction by body hash.
    Instruction([u8; 32]),
}

/// What one channel looks like on a node, for anti-entropy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelDigest {
    /// Channel.
    pub channel: Channel,
    /// Highest version accepted.
    pub highest: u64,
    /// Retained manifests: version and id.
    pub manifests: Vec<(u64, ManifestId)>,
}

/// A node's summary of what it holds; peers answer by pulling or pushing the difference.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Trust-root version (0: none).
    pub trust_version: u64,
    /// Per channel.
    pub channels: Vec<ChannelDigest>,
    /// Per release with reports: manifest id, sample digest.
    pub reports: Vec<(ManifestId, [u8; 32])>,
    /// Latest instruction per release: body hashes.
    pub instructions: Vec<[u8; 32]>,
    /// This digest answers one (do not answer back).
    pub reply: bool,
}

/// Why a chunk request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The node does not have that chunk.
    NotFound,
    /// Too many uploads in progress.
    Busy,
    /// Not allowed (e.g. uncertified peer).
    Refused,
}

/// Control messages of the pollen protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// A manifest (eager push, or an answer to a want).
    Manifest(SignedManifest),
    /// A trust root.
    TrustRoot(SignedTrustRoot),
    /// Health reports.
    Reports(Vec<HealthReport>),
    /// A rollout instruction.
    Instruction(SignedInstruction),
    /// Lazy push: ids the sender holds.
    IHave(Vec<ObjectId>),
    /// Pull: send me these.
    Want(Vec<ObjectId>),
    /// Anti-entropy summary.
    Digest(Digest),
    /// The sender's chunks of a file.
    Have {
        /// File.
        file: ContentId,
        /// Which chunks.
        chunks: Bitfield,
    },
    /// The sender now has one more chunk.
    HaveChunk {
        /// File.
        file: ContentId,
        /// Chunk index.
        index: u32,
    },
    /// Ask for a chunk.
    Request {
        /// Request id, echoed in the chunk frame or reject.
        id: u64,
        /// File.
        file: ContentId,
        /// Chunk index.
        index: u32,
    },
    /// Withdraw a request.
    Cancel {
        /// Request id.
        id: u64,
    },
    /// Refuse a request.
    Reject {
        /// Request id.
        id: u64,
        /// Why.
        reason: RejectReason,
    },
    /// The sender's node certificate (fleets).
    Certificate(SignedNodeCert),
    /// First frame on a connection's control stream: who the sender is. Drivers consume
    /// it (the site and certificate go into [`crate::io::PeerInfo`]); the core ignores it.
    Hello(Hello),
    /// Gossip tree repair (plumtree): the sender got a payload from us that it already
    /// had, so we send it only `IHave`s from now on (until it pulls with `Want`).
    Prune,
    /// The sender has asked a peer on another site for this chunk. Sent to the sender's
    /// site peers, which leave the chunk to it for a while rather than fetch it across the
    /// site's WAN link again (the WAN share rule), and to its peers on third sites, which
    /// ask the WAN for the chunk after the others meanwhile. A hint: a node that does not
    /// know this kind ignores it.
    Fetching {
        /// File.
        file: ContentId,
        /// Chunk index.
        index: u32,
        /// How long the sender's request may take, milliseconds (its deadline).
        millis: u32,
    },
    /// A kind this version does not know: ignored.
    Unknown(u8),
}

/// What a node says about itself when a connection opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's site (LAN) name, at most 64 bytes.
    pub site: Option<String>,
    /// The sender's node certificate, in fleets.
    pub cert: Option<SignedNodeCert>,
}

/// The header of a chunk data frame; the chunk bytes follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// Request id.
    pub id: u64,
    /// File.
    pub file: ContentId,
    /// Chunk index.
    pub index: u32,
}

/// Errors decoding a frame. Each one closes the stream and penalises the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Longer than the cap for its kind.
    #[error("frame of {len} bytes exceeds the cap of {cap}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// Cap for the kind.
        cap: usize,
    },
    /// Zero-length frame.
    #[error("empty frame")]
    Empty,
    /// Payload does not decode.
    #[error("malformed {kind:#x} frame: {msg}")]
    Malformed {
        /// Kind byte.
        kind: u8,
        /// Decoder message.
        msg: String,
    },
    /// A list longer than allowed.
    #[error("list of {0} items exceeds {MAX_LIST}")]
    ListTooLong(usize),
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A control message.
    Control(Message),
    /// A chunk: header and the bytes (not yet verified).
    Chunk(ChunkHeader, &'a [u8]),
}

const K_MANIFEST: u8 = 1;
const K_TRUST: u8 = 2;
const K_REPORTS: u8 = 3;
const K_INSTRUCTION: u8 = 4;
const K_IHAVE: u8 = 5;
const K_WANT: u8 = 6;
const K_DIGEST: u8 = 7;
const K_HAVE: u8 = 8;
const K_HAVE_CHUNK: u8 = 9;
const K_REQUEST: u8 = 10;
const K_CANCEL: u8 = 11;
const K_REJECT: u8 = 12;
const K_CERT: u8 = 13;
const K_HELLO: u8 = 14;
const K_PRUNE: u8 = 15;
const K_FETCHING: u8 = 16;

/// The cap for a frame of `kind`.
pub fn frame_cap(kind: u8) -> usize {
    if kind == KIND_CHUNK {
        MAX_CHUNK_FRAME
    } else {
        MAX_CONTROL_FRAME
    }
}

fn body<T: Serialize>(kind: u8, v: &T) -> Vec<u8> {
    let mut out = vec![kind];
    // Encoding our own types into a Vec cannot fail.
    out.extend(postcard::to_allocvec(v).expect("postcard encoding into a Vec"));
    out
}

impl Message {
    /// Encode as a frame body (kind + payload), without the length prefix.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Manifest(m) => body(K_MANIFEST, m),
            Message::TrustRoot(t) => body(K_TRUST, t),
            Message::Reports(r) => body(K_REPORTS, r),
            Message::Instruction(i) => body(K_INSTRUCTION, i),
            Message::IHave(ids) => body(K_IHAVE, ids),
            Message::Want(ids) => body(K_WANT, ids),
            Message::Digest(d) => body(K_DIGEST, d),
            Message::Have { file, chunks } => body(K_HAVE, &(file, chunks)),
            Message::HaveChunk { file, index } => body(K_HAVE_CHUNK, &(file, index)),
            Message::Request { id, file, index } => body(K_REQUEST, &(id, file, index)),
            Message::Cancel { id } => body(K_CANCEL, id),
            Message::Reject { id, reason } => body(K_REJECT, &(id, reason)),
            Message::Certificate(c) => body(K_CERT, c),
            Message::Hello(h) => body(K_HELLO, h),
            Message::Prune => vec![K_PRUNE],
            Message::Fetching {
                file,
                index,
                millis,
            } => body(K_FETCHING, &(file, index, millis)),
            Message::Unknown(k) => vec![*k],
        }
    }

    /// Encoded size in bytes, including the 4-byte length prefix.
    pub fn wire_len(&self) -> usize {
        4 + self.encode().len()
    }
}

/// Encode a chunk frame body: kind, header, then the chunk bytes.
pub fn encode_chunk_frame(header: &ChunkHeader, data: &[u8]) -> Vec<u8> {
    let mut out = body(KIND_CHUNK, header);
    out.extend_from_slice(data);
    out
}

/// Encode the chunk-frame prefix (kind + header); the caller appends `data_len` bytes.
pub fn encode_chunk_prefix(header: &ChunkHeader) -> Vec<u8> {
    body(KIND_CHUNK, header)
}

fn payload<T: Serialize + serde::de::DeserializeOwned>(
    kind: u8,
    bytes: &[u8],
) -> Result<T, WireError> {
    decode_canonical(bytes).map_err(|e| WireError::Malformed {
        kind,
        msg: e.to_string(),
    })
}

fn bounded<T>(v: Vec<T>) -> Result<Vec<T>, WireError> {
    if v.len() > MAX_LIST {
        Err(WireError::ListTooLong(v.len()))
    } else {
        Ok(v)
    }
}

/// Decode a frame body (kind + payload, no length prefix).
pub fn decode_frame(frame: &[u8]) -> Result<Frame<'_>, WireError> {
    let (&kind, rest) = frame.split_first().ok_or(WireError::Empty)?;
    let cap = frame_cap(kind);
    if frame.len() > cap {
        return Err(WireError::TooLarge {
            len: frame.len(),
            cap,
        });
    }
    let msg = match kind {
        KIND_CHUNK => {
            let (header, data): (ChunkHeader, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| WireError::Malformed {
                    kind,
                    msg: e.to_string(),
                })?;
            if rest.len() - data.len() > MAX_CHUNK_HEADER || data.len() > MAX_CHUNK_SIZE as usize {
                return Err(WireError::Malformed {
                    kind,
                    msg: "chunk frame too large".into(),
                });
            }
            return Ok(Frame::Chunk(header, data));
        }
        K_MANIFEST => Message::Manifest(payload(kind, rest)?),
        // No payload: bytes after the kind are as non-canonical as trailing bytes after
        // any other payload.
        K_PRUNE => {
            payload::<()>(kind, rest)?;
            Message::Prune
        }
        K_TRUST => Message::TrustRoot(payload(kind, rest)?),
        K_REPORTS => Message::Reports(bounded(payload(kind, rest)?)?),
        K_INSTRUCTION => Message::Instruction(payload(kind, rest)?),
        K_IHAVE => Message::IHave(bounded(payload(kind, rest)?)?),
        K_WANT => Message::Want(bounded(payload(kind, rest)?)?),
        K_DIGEST => {
            let d: Digest = payload(kind, rest)?;
            let n = d
                .channels
                .len()
                .max(d.reports.len())
                .max(d.instructions.len());
            if n > MAX_LIST {
                return Err(WireError::ListTooLong(n));
            }
            Message::Digest(d)
        }
        K_HAVE => {
            let (file, chunks): (ContentId, Bitfield) = payload(kind, rest)?;
            if !chunks.is_valid() {
                return Err(WireError::Malformed {
                    kind,
                    msg: "bitfield length mismatch".into(),
                });
            }
            Message::Have { file, chunks }
        }
        K_HAVE_CHUNK => {
            let (file, index) = payload(kind, rest)?;
            Message::HaveChunk { file, index }
        }
        K_FETCHING => {
            let (file, index, millis) = payload(kind, rest)?;
            Message::Fetching {
                file,
                index,
                millis,
            }
        }
        K_REQUEST => {
            let (id, file, index) = payload(kind, rest)?;
            Message::Request { id, file, index }
        }
        K_CANCEL => Message::Cancel {
            id: payload(kind, rest)?,
        },
        K_REJECT => {
            let (id, reason) = payload(kind, rest)?;
            Message::Reject { id, reason }
        }
        K_CERT => Message::Certificate(payload(kind, rest)?),
        K_HELLO => {
            let h: Hello = payload(kind, rest)?;
            if h.site.as_ref().is_some_and(|s| s.len() > 64) {
                return Err(WireError::Malformed {
                    kind,
                    msg: "site name longer than 64 bytes".into(),
                });
            }
            Message::Hello(h)
        }
        other => Message::Unknown(other),
    };
    Ok(Frame::Control(msg))
}

/// Incremental decoder for a byte stream of length-prefixed frames (pure: the driver feeds
/// bytes in and takes frames out). Rejects a frame as soon as its length and kind are
/// known to exceed the cap, before buffering it.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Check the header of the next frame: `Ok(Some(len))` when a complete frame of `len`
    /// body bytes is buffered, `Ok(None)` when more bytes are needed, `Err` for a frame
    /// over its cap (the stream must be closed).
    pub fn check(&self) -> Result<Option<usize>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            return Err(WireError::Empty);
        }
        let cap = match self.buf.get(4) {
            Some(&kind) => frame_cap(kind),
            None => MAX_CHUNK_FRAME,
        };
        if len > cap {
            return Err(WireError::TooLarge { len, cap });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        Ok(Some(len))
    }

    /// Remove and return the next complete frame body, if any.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        match self.check()? {
            None => Ok(None),
            Some(len) => {
                let frame = self.buf[4..4 + len].to_vec();
                self.buf.drain(..4 + len);
                Ok(Some(frame))
            }
        }
    }
}

/// Prefix a frame body with its length.
pub fn length_prefixed(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_unknown_kinds() {
        let msgs = vec![
            Message::IHave(vec![
                ObjectId::TrustRoot(3),
                ObjectId::Manifest(ManifestId([1; 32])),
            ]),
            Message::Request {
                id: 7,
                file: ContentId([2; 32]),
                index: 9,
            },
            Message::Have {
                file: ContentId([3; 32]),
                chunks: Bitfield::full(13),
            },
            Message::Digest(Digest::default()),
            Message::Reject {
                id: 1,
                reason: RejectReason::Busy,
            },
            Message::Fetching {
                file: ContentId([5; 32]),
                index: 70_000,
                millis: 30_000,
            },
        ];
        for m in msgs {
            let enc = m.encode();
            assert_eq!(decode_frame(&enc).unwrap(), Frame::Control(m));
        }
        assert_eq!(
            decode_frame(&[0x7f, 1, 2, 3]).unwrap(),
            Frame::Control(Message::Unknown(0x7f))
        );
        let h = ChunkHeader {
            id: 5,
            file: ContentId([4; 32]),
            index: 2,
        };
        let f = encode_chunk_frame(&h, b"hello");
        assert_eq!(decode_frame(&f).unwrap(), Frame::Chunk(h, b"hello"));
    }

    #[test]
    fn rejects_malformed_and_oversized() {
        assert_eq!(decode_frame(&[]), Err(WireError::Empty));
        assert!(decode_frame(&[K_REQUEST, 0xff]).is_err());
        // Trailing bytes after a valid payload are non-canonical.
        let mut enc = Message::Cancel { id: 3 }.encode();
        enc.push(0);
        assert!(decode_frame(&enc).is_err());
        // A non-minimal varint is non-canonical.
        assert!(decode_frame(&[K_CANCEL, 0x83, 0x00]).is_err());
        // Prune has no payload: any byte after the kind is refused (found by the
        // wire_decode fuzz target: it decoded, and re-encoded to the kind alone).
        assert_eq!(
            decode_frame(&[K_PRUNE]).unwrap(),
            Frame::Control(Message::Prune)
        );
        assert!(decode_frame(&[K_PRUNE, K_PRUNE]).is_err());
        assert!(decode_frame(&[K_PRUNE, 3, 0, 0xac]).is_err());
        // Bitfield claiming more bits than bytes.
        let bad = body(K_HAVE, &(ContentId([0; 32]), (100u32, vec![0u8; 2])));
        assert!(decode_frame(&bad).is_err());
        let big = vec![K_MANIFEST; MAX_CONTROL_FRAME + 1];
        assert!(matches!(
            decode_frame(&big),
            Err(WireError::TooLarge { .. })
        ));
        // The stream buffer refuses an oversized control frame from its header alone.
        let mut fb = FrameBuffer::new();
        fb.extend(&((MAX_CONTROL_FRAME as u32 + 1).to_be_bytes()));
        fb.extend(&[K_MANIFEST]);
        assert!(matches!(fb.next_frame(), Err(WireError::TooLarge { .. })));
        // A huge list length claim fails without allocating it.
        let mut claim = vec![K_WANT];
        claim.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_frame(&claim).is_err());
    }

    #[test]
    fn frame_buffer_reassembles() {
        let a = Message::Cancel { id: 1 }.encode();
        let b = Message::Cancel { id: 2 }.encode();
        let mut stream = length_prefixed(&a);
        stream.extend(length_prefixed(&b));
        let mut fb = FrameBuffer::new();
        let mut out = Vec::new();
        for byte in stream {
            fb.extend(&[byte]);
            while let Some(f) = fb.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, vec![a, b]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
            let mut fb = FrameBuffer::new();
            fb.extend(&bytes);
            while let Ok(Some(f)) = fb.next_frame() { let _ = decode_frame(&f); }
        }
    }
}
