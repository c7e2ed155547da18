//! Signed objects: canonical postcard bodies, ed25519 signatures with a domain per kind.
//!
//! A signed object is an envelope `{ body, signatures }` where `body` is the postcard
//! encoding of the object exactly as the signer produced it. Signatures are ed25519 over
//! `domain || body` where the domain differs per kind ([`Domain`]), so that no signature can
//! be replayed as another kind of object. Verification uses `verify_strict` over the bytes
//! as received, and a body whose re-encoding differs from those bytes is rejected, because
//! postcard decoding is lenient (e.g. non-minimal varints) and two byte strings must never
//! mean the same object.

use crate::ids::PublicKey;
use core::fmt;
use core::marker::PhantomData;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Most signatures an envelope may carry; more is malformed.
pub const MAX_SIGNATURES: usize = 16;

/// The kinds of signed object; each has its own signing domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Domain {
    /// A version manifest (publisher keys).
    Manifest,
    /// A trust root (root keys).
    TrustRoot,
    /// An operator's rollout instruction such as halt or resume (publisher keys).
    RolloutInstruction,
    /// A node's health report (node key).
    HealthReport,
    /// A node certificate (fleet key).
    NodeCertificate,
}

impl Domain {
    /// The bytes prepended to a body before signing.
    pub const fn prefix(self) -> &'static [u8] {
        match self {
            Domain::Manifest => b"pollen/v1/manifest\0",
            Domain::TrustRoot => b"pollen/v1/trust-root\0",
            Domain::RolloutInstruction => b"pollen/v1/rollout-instruction\0",
            Domain::HealthReport => b"pollen/v1/health-report\0",
            Domain::NodeCertificate => b"pollen/v1/node-certificate\0",
        }
    }
}

/// Errors decoding or checking a signed object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignedError {
    /// The bytes are not a valid encoding.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// The bytes decode but are not the canonical encoding of what they decode to.
    #[error("non-canonical encoding")]
    NonCanonical,
    /// The object decodes but breaks a rule of its kind.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Too many signatures in the envelope.
    #[error("more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
}

/// A 64-byte ed25519 signature, serialized as a byte string.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SigBytes(pub [u8; 64]);

impl fmt::Debug for SigBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sig({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl Serialize for SigBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SigBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SigBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<SigBytes, E> {
                <[u8; 64]>::try_from(v)
                    .map(SigBytes)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<SigBytes, E> {
                self.visit_bytes(v)
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<SigBytes, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// One signature in an envelope: the signer's public key and the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The signer's ed25519 public key.
    pub key: PublicKey,
    /// ed25519 signature over `domain || body`.
    pub sig: SigBytes,
}

/// A body type that can be signed: names its domain and its own validity rules.
pub trait SignedBody: Serialize + DeserializeOwned {
    /// The signing domain of this kind.
    const DOMAIN: Domain;
    /// Rules beyond decoding (field ranges, consistency). Called on every decode.
    fn validate(&self) -> Result<(), String>;

    /// The bytes to sign: canonical postcard unless a kind keeps older encodings (see
    /// [`crate::manifest::ManifestBody`]).
    fn encode(&self) -> Vec<u8> {
        // postcard encoding of our own types into a Vec cannot fail.
        postcard::to_allocvec(self).expect("postcard encoding into a Vec")
    }

    /// Decode signed bytes; they must be exactly what [`SignedBody::encode`] gives.
    fn decode(bytes: &[u8]) -> Result<Self, SignedError> {
        decode_canonical(bytes)
    }
}

/// Decode canonical postcard: the bytes must re-encode to themselves.
pub fn decode_canonical<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, SignedError> {
    let v: T = postcard::from_bytes(bytes).map_err(|e| SignedError::Malformed(e.to_string()))?;
    let again = postcard::to_allocvec(&v).map_err(|e| SignedError::Malformed(e.to_string()))?;
    if again != bytes {
        return Err(SignedError::NonCanonical);
    }
    Ok(v)
}

/// A signed object of kind `T`: the body bytes exactly as signed, and signatures.
///
/// Both are shared, not copied, between clones: gossip sends one manifest to every peer
/// on the tree, and each copy was a deep one (the simulator held 14 per node in flight at
/// a release's peak, 885 bytes each). The wire form is the same as two `Vec`s.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    body: Arc<[u8]>,
    signatures: Arc<[SignatureEntry]>,
    #[serde(skip)]
    _kind: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed {
            body: self.body.clone(),
            signatures: self.signatures.clone(),
            _kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, o: &Self) -> bool {
        self.body == o.body && self.signatures == o.signatures
    }
}
impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field(
                "body_hash",
                &crate::ids::ManifestId(*blake3::hash(&self.body).as_bytes()),
            )
            .field("body_len", &self.body.len())
            .field("signatures", &self.signatures.len())
            .finish()
    }
}

impl<T: SignedBody> Signed<T> {
    /// Encode `body` canonically and sign it with each key.
    pub fn sign(body: &T, keys: &[&SigningKey]) -> Self {
        let bytes = body.encode();
        let mut s = Signed {
            body: bytes.into(),
            signatures: Arc::new([]),
            _kind: PhantomData,
        };
        for k in keys {
            s.add_signature(k);
        }
        s
    }

    /// Add (or replace) the signature of `key`, for offline multi-party signing.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let pk = PublicKey::from(key);
        let sig = key.sign(&signing_message(T::DOMAIN, &self.body));
        let mut v: Vec<SignatureEntry> = self
            .signatures
            .iter()
            .filter(|e| e.key != pk)
            .cloned()
            .collect();
        v.push(SignatureEntry {
            key: pk,
            sig: SigBytes(sig.to_bytes()),
        });
        self.signatures = v.into();
    }

    /// Decode and validate the body. Errors on non-canonical bytes or broken rules.
    pub fn decode_body(&self) -> Result<T, SignedError> {
        let b = T::decode(&self.body)?;
        b.validate().map_err(SignedError::Invalid)?;
        Ok(b)
    }

    /// The distinct keys, among those `authorised` accepts, whose signatures verify
    /// (strictly) over this body. Unauthorised or invalid signatures are not counted.
    pub fn valid_signers(&self, mut authorised: impl FnMut(&PublicKey) -> bool) -> Vec<PublicKey> {
        let msg = signing_message(T::DOMAIN, &self.body);
        let mut ok: Vec<PublicKey> = Vec::new();
        for e in self.signatures.iter() {
            if ok.contains(&e.key) || !authorised(&e.key) {
                continue;
            }
            if verify(&e.key, &msg, &e.sig) {
                ok.push(e.key);
            }
        }
        ok
    }

    /// Serialize the envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("postcard encoding into a Vec")
    }

    /// Parse an envelope and its body (canonical, validated). Signatures are not checked
    /// here: that needs a trust root.
    pub fn from_bytes(bytes: &[u8]) -> Result<(Self, T), SignedError> {
        let s: Signed<T> = decode_canonical(bytes)?;
        s.check_envelope()?;
        let b = s.decode_body()?;
        Ok((s, b))
    }

    /// Envelope rules: a bounded number of signatures.
    pub fn check_envelope(&self) -> Result<(), SignedError> {
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(SignedError::TooManySignatures);
        }
        Ok(())
    }
}

impl<T> Signed<T> {
    /// The body bytes exactly as signed.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The signatures.
    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    /// BLAKE3 of the body bytes (for a manifest, its id).
    pub fn body_hash(&self) -> [u8; 32] {
        *blake3::hash(&self.body).as_bytes()
    }

    /// Build an envelope from raw parts (tests, and adversaries in the harness).
    pub fn from_parts(body: Vec<u8>, signatures: Vec<SignatureEntry>) -> Self {
        Signed {
            body: body.into(),
            signatures: signatures.into(),
            _kind: PhantomData,
        }
    }

    /// Keep only the signatures `keep` accepts (used to cap envelopes before relaying).
    pub fn retain_signatures(&mut self, mut keep: impl FnMut(&SignatureEntry) -> bool) {
        let kept: Vec<SignatureEntry> = self
            .signatures
            .iter()
            .filter(|e| keep(e))
            .cloned()
            .collect();
        if kept.len() != self.signatures.len() {
            self.signatures = kept.into();
        }
    }
}

/// `domain || body`.
pub fn signing_message(domain: Domain, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.prefix().len() + body.len());
    m.extend_from_slice(domain.prefix());
    m.extend_from_slice(body);
    m
}

/// Strict ed25519 verification of `sig` by `key` over `msg`. False on any malformed input.
pub fn verify(key: &PublicKey, msg: &[u8], sig: &SigBytes) -> bool {
    let Ok(vk) = VerifyingKey::from_bytes(&key.0) else {
        return false;
    };
    vk.verify_strict(msg, &Signature::from_bytes(&sig.0))
        .is_ok()
}

/// Sign `domain || body` with one key (for single-signer objects such as health reports).
pub fn sign_raw(domain: Domain, body: &[u8], key: &SigningKey) -> SigBytes {
    SigBytes(key.sign(&signing_message(domain, body)).to_bytes())
}

/// The public key of a signing key.
pub fn public_key(key: &SigningKey) -> PublicKey {
    PublicKey::from(key)
}
