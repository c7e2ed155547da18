//! Trust roots: which keys may publish what, rotation, node certificates.
//!
//! A trust root lists root keys (which sign trust roots) with a threshold, publisher keys
//! with the channels each may sign and a threshold for manifests and rollout instructions,
//! an expiry and a version, and optionally a fleet key: when present, a node needs a
//! certificate of its node key signed by the fleet key to join the mesh, and only
//! certified nodes' health reports count.

pub use crate::cert::{NodeCertBody, SignedNodeCert};
use crate::ids::{Channel, NodeId, PublicKey};
use crate::manifest::Manifest;
use crate::signing::{Domain, Signed, SignedBody, SignedError};
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};

/// Most root or publisher keys in one trust root.
pub const MAX_KEYS: usize = 32;

/// A channel pattern: `*` (every channel), `prefix.*` (channels under a prefix) or an exact
/// channel name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelPattern(pub String);

impl ChannelPattern {
    /// Does this pattern allow `channel`?
    pub fn allows(&self, channel: &Channel) -> bool {
        let p = self.0.as_str();
        if p == "*" {
            return true;
        }
        if let Some(prefix) = p.strip_suffix('*') {
            return prefix.ends_with('.') && channel.as_str().starts_with(prefix);
        }
        p == channel.as_str()
    }

    /// A validated pattern.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let p = ChannelPattern(pattern.to_string());
        p.validate()?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        let p = self.0.as_str();
        if p == "*" {
            return Ok(());
        }
        let name = p.strip_suffix(".*").unwrap_or(p);
        Channel::new(name).map(|_| ())
    }
}

/// A key allowed to sign manifests, and for which channels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publisher {
    /// The publisher's public key.
    pub key: PublicKey,
    /// A label for humans.
    pub name: String,
    /// Channels this key may sign.
    pub channels: Vec<ChannelPattern>,
}

/// The signed body of a trust root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRootBody {
    /// Strictly increasing across rotations, from 1.
    pub version: u64,
    /// Creation time.
    pub created: UnixTime,
    /// Expiry: past it the root authorises nothing new.
    pub expires: UnixTime,
    /// Keys that sign trust roots.
    pub root_keys: Vec<PublicKey>,
    /// Distinct root signatures needed for a trust root.
    pub root_threshold: u8,
    /// Keys that sign manifests and rollout instructions.
    pub publishers: Vec<Publisher>,
    /// Distinct authorised publisher signatures needed per manifest or instruction.
    pub publish_threshold: u8,
    /// If present, nodes need a certificate from this key.
    pub fleet_key: Option<PublicKey>,
}

impl TrustRootBody {
    /// A version-1 trust root with one root key and one publisher (named `publisher`,
    /// allowed on the channels matching `channels`), both thresholds 1, no fleet key,
    /// valid from `created` to `expires`. Sign it with the root key.
    pub fn single_publisher(
        root: PublicKey,
        publisher: PublicKey,
        channels: ChannelPattern,
        created: UnixTime,
        expires: UnixTime,
    ) -> TrustRootBody {
        TrustRootBody {
            version: 1,
            created,
            expires,
            root_keys: vec![root],
            root_threshold: 1,
            publishers: vec![Publisher {
                key: publisher,
                name: "publisher".into(),
                channels: vec![channels],
            }],
            publish_threshold: 1,
            fleet_key: None,
        }
    }
}

fn unique(keys: impl Iterator<Item = PublicKey>) -> bool {
    let v: Vec<_> = keys.collect();
    v.iter().enumerate().all(|(i, k)| !v[..i].contains(k))
}

impl SignedBody for TrustRootBody {
    const DOMAIN: Domain = Domain::TrustRoot;

    fn validate(&self) -> Result<(), String> {
        if self.version == 0 {
            return Err("trust root version must be at least 1".into());
        }
        if self.expires <= self.created {
            return Err("expires must be after created".into());
        }
        if self.root_keys.is_empty() || self.root_keys.len() > MAX_KEYS {
            return Err(format!("1 to {MAX_KEYS} root keys"));
        }
        if self.publishers.len() > MAX_KEYS {
            return Err(format!("at most {MAX_KEYS} publishers"));
        }
        if !unique(self.root_keys.iter().copied()) || !unique(self.publishers.iter().map(|p| p.key))
        {
            return Err("duplicate key".into());
        }
        if self.root_threshold == 0 || usize::from(self.root_threshold) > self.root_keys.len() {
            return Err("root threshold must be between 1 and the number of root keys".into());
        }
        if self.publish_threshold == 0
            || (!self.publishers.is_empty()
                && usize::from(self.publish_threshold) > self.publishers.len())
        {
            return Err("publish threshold must be between 1 and the number of publishers".into());
        }
        for p in &self.publishers {
            if p.name.len() > 128 || p.channels.len() > 64 {
                return Err("publisher entry too large".into());
            }
            for c in &p.channels {
                c.validate()
                    .map_err(|e| format!("channel pattern {:?}: {e}", c.0))?;
            }
        }
        Ok(())
    }
}

/// A signed trust root as it travels.
pub type SignedTrustRoot = Signed<TrustRootBody>;

/// Why a manifest, instruction or trust root was refused. The variants are the reasons
/// counted in metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Bad encoding or broken field rules.
    #[error("malformed: {0}")]
    Malformed(#[from] SignedError),
    /// No valid signature from any key this trust root knows.
    #[error("no valid signature from a known key (forged)")]
    Forged,
    /// Valid signatures, but from keys not allowed to sign this channel.
    #[error("signing keys are not allowed to sign channel {0}")]
    OutOfScope(String),
    /// Fewer distinct authorised signatures than the threshold.
    #[error("{have} of {need} required signatures")]
    UnderThreshold {
        /// Valid authorised signatures.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// Past its expiry time.
    #[error("expired")]
    Expired,
    /// The trust root itself has expired.
    #[error("trust root expired")]
    TrustRootExpired,
    /// Version not above the highest accepted (replay / rollback attempt).
    #[error("version {got} is not above the highest accepted ({highest})")]
    Stale {
        /// Version offered.
        got: u64,
        /// Highest accepted.
        highest: u64,
    },
    /// A signed timestamp further ahead of this node's clock than the skew tolerance.
    #[error("signed {ahead_ms} ms ahead of this clock (beyond the skew tolerance)")]
    Future {
        /// How far ahead.
        ahead_ms: u64,
    },
    /// A node certificate that does not check out.
    #[error("bad node certificate: {0}")]
    BadCertificate(String),
    /// A valid object this node has no room for (a table at its bound). Not the sender's
    /// fault: it is never a reason to penalise a peer.
    #[error("no room: {0}")]
    Capacity(String),
}

impl TrustError {
    /// A short stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            TrustError::Malformed(_) => "malformed",
            TrustError::Forged => "forged",
            TrustError::OutOfScope(_) => "out_of_scope",
            TrustError::UnderThreshold { .. } => "under_threshold",
            TrustError::Expired => "expired",
            TrustError::TrustRootExpired => "trust_root_expired",
            TrustError::Stale { .. } => "stale",
            TrustError::Future { .. } => "future",
            TrustError::BadCertificate(_) => "bad_certificate",
            TrustError::Capacity(_) => "capacity",
        }
    }
}

/// A verified trust root in force on a node.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustRoot {
    /// The envelope as received.
    pub signed: SignedTrustRoot,
    /// The decoded body.
    pub body: TrustRootBody,
}

impl TrustRoot {
    /// Accept an initial trust root handed to the node by its operator: it must be signed by
    /// the threshold of its own root keys and not expired.
    pub fn bootstrap(signed: SignedTrustRoot, now: UnixTime) -> Result<Self, TrustError> {
        let root = Self::verify_self_signed(signed)?;
        if root.body.expires <= now {
            return Err(TrustError::Expired);
        }
        Ok(root)
    }

    /// Check that a trust root is signed by the threshold of its own root keys, whatever
    /// the time (tools that inspect or rotate an expired root).
    pub fn verify_self_signed(signed: SignedTrustRoot) -> Result<Self, TrustError> {
        signed.check_envelope()?;
        let body = signed.decode_body()?;
        let signers = signed.valid_signers(|k| body.root_keys.contains(k));
        if signers.len() < usize::from(body.root_threshold) {
            return Err(threshold_error(signers.len(), body.root_threshold, &signed));
        }
        Ok(TrustRoot { signed, body })
    }

    /// Check a successor (rotation): a higher version signed by the threshold of *this*
    /// root's keys. Keys absent from the successor are revoked by omission.
    pub fn verify_successor(
        &self,
        signed: SignedTrustRoot,
        now: UnixTime,
    ) -> Result<TrustRoot, TrustError> {
        signed.check_envelope()?;
        let body = signed.decode_body()?;
        if body.version <= self.body.version {
            return Err(TrustError::Stale {
                got: body.version,
                highest: self.body.version,
            });
        }
        let signers = signed.valid_signers(|k| self.body.root_keys.contains(k));
        if signers.len() < usize::from(self.body.root_threshold) {
            return Err(threshold_error(
                signers.len(),
                self.body.root_threshold,
                &signed,
            ));
        }
        if body.expires <= now {
            return Err(TrustError::Expired);
        }
        Ok(TrustRoot { signed, body })
    }

    /// Does `other` carry a well-formed envelope and at least the root threshold of
    /// signatures by this root's root keys? (Evidence of equivocation for a root of the
    /// same version: the keys that sign successors signed it. Roots whose root keys
    /// rotated in between are not caught; the check costs at most one envelope's
    /// signatures.)
    pub fn signed_by_root_keys(&self, other: &SignedTrustRoot) -> bool {
        other.check_envelope().is_ok()
            && other
                .valid_signers(|k| self.body.root_keys.contains(k))
                .len()
                >= usize::from(self.body.root_threshold)
    }

    /// Publisher keys allowed to sign `channel`.
    pub fn may_sign(&self, key: &PublicKey, channel: &Channel) -> bool {
        self.body
            .publishers
            .iter()
            .any(|p| &p.key == key && p.channels.iter().any(|c| c.allows(channel)))
    }

    /// Check signatures over a publisher-signed object for `channel`.
    pub fn authorise_publisher_signed<T: SignedBody>(
        &self,
        signed: &Signed<T>,
        channel: &Channel,
        now: UnixTime,
    ) -> Result<(), TrustError> {
        if self.body.expires <= now {
            return Err(TrustError::TrustRootExpired);
        }
        let need = usize::from(self.body.publish_threshold);
        let authorised = signed.valid_signers(|k| self.may_sign(k, channel));
        if authorised.len() >= need {
            return Ok(());
        }
        if !authorised.is_empty() {
            return Err(TrustError::UnderThreshold {
                have: authorised.len(),
                need,
            });
        }
        let known = signed.valid_signers(|k| self.body.publishers.iter().any(|p| &p.key == k));
        if known.is_empty() {
            Err(TrustError::Forged)
        } else {
            Err(TrustError::OutOfScope(channel.to_string()))
        }
    }

    /// Signatures, scope and expiry of a manifest (version rules are the caller's, who
    /// knows the highest accepted version).
    pub fn authorise_manifest(&self, m: &Manifest, now: UnixTime) -> Result<(), TrustError> {
        self.authorise_publisher_signed(&m.signed, &m.body.channel, now)?;
        if m.body.expires <= now {
            return Err(TrustError::Expired);
        }
        Ok(())
    }

    /// Check a node certificate against the fleet key. `Ok(())` when no fleet key is set.
    pub fn check_certificate(
        &self,
        node: &NodeId,
        cert: Option<&SignedNodeCert>,
        now: UnixTime,
    ) -> Result<(), TrustError> {
        let Some(fleet) = self.body.fleet_key else {
            return Ok(());
        };
        let cert = cert.ok_or_else(|| TrustError::BadCertificate("no certificate".into()))?;
        cert.check_envelope()?;
        let body = cert.decode_body()?;
        if &body.node != node {
            return Err(TrustError::BadCertificate(
                "certificate is for another node".into(),
            ));
        }
        if cert.valid_signers(|k| *k == fleet).is_empty() {
            return Err(TrustError::BadCertificate(
                "not signed by the fleet key".into(),
            ));
        }
        if body.expires <= now {
            return Err(TrustError::BadCertificate("expired".into()));
        }
        Ok(())
    }

    /// Does this root require node certificates?
    pub fn requires_certificates(&self) -> bool {
        self.body.fleet_key.is_some()
    }
}

fn threshold_error<T>(have: usize, need: u8, signed: &Signed<T>) -> TrustError {
    if have == 0 && !signed.signatures().is_empty() {
        TrustError::Forged
    } else {
        TrustError::UnderThreshold {
            have,
            need: usize::from(need),
        }
    }
}
