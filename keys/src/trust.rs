//! Trust roots: creation, rotation, offline co-signing and a human-readable view.
//!
//! Every function here checks its result with the same code a node runs
//! ([`TrustRoot::bootstrap`] for a first root, [`TrustRoot::verify_successor`] for a
//! rotation), so what the operator writes is what nodes accept. A root that is validly
//! signed but by fewer keys than its threshold is returned as [`Completion::Partial`]: the
//! remaining key holders add their signatures offline with [`add_signature`].

use crate::keyfile::{parse_public_key, public_key};
use crate::time::format_unix;
use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use pollen_protocol::signing::{Signed, SignedBody};
use pollen_protocol::trust::{
    ChannelPattern, Publisher, SignedTrustRoot, TrustError, TrustRoot, TrustRootBody,
};
use pollen_protocol::{PublicKey, UnixTime};
use std::fmt::Write as _;
use std::path::Path;

/// How far a signed object is from being accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Completion {
    /// Signed by at least the threshold of the keys that must sign it.
    Complete {
        /// Valid signatures from those keys.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// Validly signed, but by fewer keys than the threshold: more signatures are needed.
    Partial {
        /// Valid signatures from those keys.
        have: usize,
        /// The threshold.
        need: usize,
    },
}

impl Completion {
    /// Is the threshold met?
    pub fn is_complete(self) -> bool {
        matches!(self, Completion::Complete { .. })
    }

    /// `(have, need)`.
    pub fn counts(self) -> (usize, usize) {
        match self {
            Completion::Complete { have, need } | Completion::Partial { have, need } => {
                (have, need)
            }
        }
    }
}

/// Valid signatures on `signed` from `keys`, and `threshold`, as a [`Completion`].
fn completion_among(signed: &SignedTrustRoot, keys: &[PublicKey], threshold: u8) -> Completion {
    let have = signed.valid_signers(|k| keys.contains(k)).len();
    let need = usize::from(threshold);
    if have >= need {
        Completion::Complete { have, need }
    } else {
        Completion::Partial { have, need }
    }
}

/// Self-signatures: valid signatures by the root's own root keys against its own threshold.
/// This is what [`TrustRoot::bootstrap`] requires of a root a node starts from.
pub fn self_completion(signed: &SignedTrustRoot, body: &TrustRootBody) -> Completion {
    completion_among(signed, &body.root_keys, body.root_threshold)
}

/// Signatures by `current`'s root keys against its threshold: what
/// [`TrustRoot::verify_successor`] requires of a rotation.
pub fn successor_completion(signed: &SignedTrustRoot, current: &TrustRoot) -> Completion {
    completion_among(signed, &current.body.root_keys, current.body.root_threshold)
}

/// Turn a node's verdict into a [`Completion`]: under threshold is partial; no valid
/// signature at all, or any other refusal, is an error.
fn verdict(
    result: Result<TrustRoot, TrustError>,
    completion: Completion,
    signers_role: &str,
) -> Result<Completion> {
    match result {
        Ok(_) => Ok(completion),
        Err(TrustError::UnderThreshold { have, need }) if have > 0 => {
            Ok(Completion::Partial { have, need })
        }
        Err(TrustError::UnderThreshold { .. } | TrustError::Forged) => {
            bail!("no valid signature from {signers_role}")
        }
        Err(e) => Err(anyhow::Error::new(e).context("a node would refuse this trust root")),
    }
}

/// Parse a `--publisher` argument: `KEY=PATTERN[,PATTERN...]`, where KEY is a public key
/// as [`parse_public_key`] accepts and each PATTERN is `*`, `prefix.*` or a channel name.
///
/// The publisher's name (a label for humans) is the key file's stem when KEY is a path,
/// else empty. Patterns are checked when the trust root body is validated.
pub fn parse_publisher(arg: &str) -> Result<Publisher> {
    // Patterns never contain '=', so the last one separates the key from them.
    let (key, patterns) = arg
        .rsplit_once('=')
        .with_context(|| format!("publisher {arg:?} is not KEY=PATTERN[,PATTERN...]"))?;
    let pk = parse_public_key(key).with_context(|| format!("publisher {arg:?}"))?;
    let channels: Vec<ChannelPattern> = patterns
        .split(',')
        .map(|p| ChannelPattern(p.trim().to_string()))
        .collect();
    if channels.iter().any(|c| c.0.is_empty()) {
        bail!("publisher {arg:?} has an empty channel pattern");
    }
    let name = if parse_hex_key(key) {
        String::new()
    } else {
        Path::new(key)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Ok(Publisher {
        key: pk,
        name,
        channels,
    })
}

fn parse_hex_key(s: &str) -> bool {
    pollen_protocol::ids::parse_hex32(s).is_some()
}

/// Check a body's field rules, with the rule in the error.
pub fn validate_body(body: &TrustRootBody) -> Result<()> {
    body.validate()
        .map_err(|e| anyhow::anyhow!("invalid trust root: {e}"))
}

/// Create and sign a first trust root (one a node can [`TrustRoot::bootstrap`] from).
///
/// Every signer must be one of `body.root_keys`. Returns the envelope and how far it is
/// from the root threshold. Errors: the body breaks a field rule, a signer is not a root
/// key, or a node would refuse the root for another reason than a missing signature (for
/// instance it has already expired at `now`).
pub fn create(
    body: &TrustRootBody,
    signers: &[&SigningKey],
    now: UnixTime,
) -> Result<(SignedTrustRoot, Completion)> {
    validate_body(body)?;
    if signers.is_empty() {
        bail!("a trust root needs at least one signing key");
    }
    for k in signers {
        let pk = public_key(k);
        if !body.root_keys.contains(&pk) {
            bail!("signing key {pk} is not one of the trust root's root keys");
        }
    }
    let signed = Signed::sign(body, signers);
    let completion = self_completion(&signed, body);
    let c = verdict(
        TrustRoot::bootstrap(signed.clone(), now),
        completion,
        "a root key",
    )?;
    Ok((signed, c))
}

/// Create and sign a rotation of `current`: `body` must have a higher version, and is
/// accepted by nodes once signed by the threshold of `current`'s root keys (checked with
/// [`TrustRoot::verify_successor`]). Keys absent from `body` are revoked by omission.
///
/// Signers may be root keys of `current` or of `body` (a signature by the new root keys
/// makes the new root usable as a first root too; see [`self_completion`]). Errors: the
/// body breaks a field rule, the version is not higher, a signer is in neither set, no
/// signer is a current root key, or a node would refuse the successor for another reason.
pub fn rotate(
    current: &TrustRoot,
    body: &TrustRootBody,
    signers: &[&SigningKey],
    now: UnixTime,
) -> Result<(SignedTrustRoot, Completion)> {
    validate_body(body)?;
    if body.version <= current.body.version {
        bail!(
            "the new trust root's version {} must be above the current version {}",
            body.version,
            current.body.version
        );
    }
    if signers.is_empty() {
        bail!("a trust root needs at least one signing key");
    }
    for k in signers {
        let pk = public_key(k);
        if !current.body.root_keys.contains(&pk) && !body.root_keys.contains(&pk) {
            bail!(
                "signing key {pk} is a root key of neither the current trust root (version {}) \
                 nor the new one",
                current.body.version
            );
        }
    }
    let signed = Signed::sign(body, signers);
    let completion = successor_completion(&signed, current);
    let c = verdict(
        current.verify_successor(signed.clone(), now),
        completion,
        &format!(
            "a root key of the current trust root (version {}): a rotation must be signed \
             by {} of them",
            current.body.version, current.body.root_threshold
        ),
    )?;
    Ok((signed, c))
}

/// Check that `signed` is signed by the threshold of its own root keys, as
/// [`TrustRoot::bootstrap`] does, but whatever the time: an expired root can still be
/// rotated (nodes that hold it accept a successor) and shown.
pub fn verify_self_signed(signed: SignedTrustRoot) -> Result<TrustRoot> {
    signed.decode_body().context("not a valid trust root")?;
    TrustRoot::verify_self_signed(signed).map_err(|e| match e {
        TrustError::UnderThreshold { have, need } => anyhow::anyhow!(
            "the trust root is signed by only {have} of the {need} root keys its threshold \
             requires"
        ),
        e => anyhow::Error::new(e).context("the trust root is not validly self-signed"),
    })
}

/// Add `key`'s signature to `signed` in place, for offline multi-party signing.
///
/// Without `current`, `signed` is a first root and `key` must be one of its root keys; the
/// result is checked as [`TrustRoot::bootstrap`] would at `now`. With `current`, `signed`
/// is a rotation of it and `key` must be a root key of either; the result is checked as
/// [`TrustRoot::verify_successor`] would. Signing twice with one key replaces its
/// signature. On error `signed` is unchanged.
pub fn add_signature(
    signed: &mut SignedTrustRoot,
    key: &SigningKey,
    current: Option<&TrustRoot>,
    now: UnixTime,
) -> Result<Completion> {
    let body = signed.decode_body().context("not a valid trust root")?;
    let pk = public_key(key);
    let mut next = signed.clone();
    next.add_signature(key);
    next.check_envelope()?;
    let c = match current {
        None => {
            if !body.root_keys.contains(&pk) {
                bail!(
                    "key {pk} is not a root key of this trust root (to co-sign a rotation, \
                     give the trust root it replaces)"
                );
            }
            verdict(
                TrustRoot::bootstrap(next.clone(), now),
                self_completion(&next, &body),
                "a root key",
            )?
        }
        Some(cur) => {
            if !cur.body.root_keys.contains(&pk) && !body.root_keys.contains(&pk) {
                bail!(
                    "key {pk} is a root key of neither the current trust root (version {}) nor \
                     this one",
                    cur.body.version
                );
            }
            verdict(
                cur.verify_successor(next.clone(), now),
                successor_completion(&next, cur),
                &format!(
                    "a root key of the current trust root (version {})",
                    cur.body.version
                ),
            )?
        }
    };
    *signed = next;
    Ok(c)
}

fn yes_no(c: Completion) -> String {
    let (have, need) = c.counts();
    let word = if c.is_complete() { "yes" } else { "NO" };
    format!("{word} ({have} of {need} required)")
}

/// A human-readable description of a trust root: its fields, each signature, whether it
/// is self-signed to its threshold, whether it has expired at `now` and, with `current`,
/// whether it is a valid successor of that root.
pub fn describe(
    signed: &SignedTrustRoot,
    body: &TrustRootBody,
    now: UnixTime,
    current: Option<&TrustRoot>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "trust root version {}", body.version);
    let _ = writeln!(s, "  created:  {}", format_unix(body.created));
    let state = if body.expires <= now {
        "EXPIRED"
    } else {
        "valid"
    };
    let _ = writeln!(s, "  expires:  {} ({state})", format_unix(body.expires));
    let _ = writeln!(
        s,
        "  root keys (threshold {} of {}):",
        body.root_threshold,
        body.root_keys.len()
    );
    for k in &body.root_keys {
        let _ = writeln!(s, "    {k}");
    }
    let _ = writeln!(
        s,
        "  publishers (threshold {} of {}):",
        body.publish_threshold,
        body.publishers.len()
    );
    for p in &body.publishers {
        let channels: Vec<&str> = p.channels.iter().map(|c| c.0.as_str()).collect();
        let name = if p.name.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.name)
        };
        let _ = writeln!(s, "    {}{name}: {}", p.key, channels.join(", "));
    }
    match body.fleet_key {
        Some(k) => {
            let _ = writeln!(s, "  fleet key: {k} (nodes need a certificate)");
        }
        None => {
            let _ = writeln!(s, "  fleet key: none (no node certificates required)");
        }
    }
    let _ = writeln!(s, "  signatures ({}):", signed.signatures().len());
    let valid: Vec<PublicKey> = signed.valid_signers(|_| true);
    for e in signed.signatures() {
        let verdict = if !valid.contains(&e.key) {
            "INVALID signature"
        } else if body.root_keys.contains(&e.key) {
            "valid, root key"
        } else if current.is_some_and(|c| c.body.root_keys.contains(&e.key)) {
            "valid, root key of the current trust root"
        } else {
            "valid, but not a root key"
        };
        let _ = writeln!(s, "    {}  {verdict}", e.key);
    }
    let _ = writeln!(
        s,
        "  self-signed to threshold: {}",
        yes_no(self_completion(signed, body))
    );
    if let Some(cur) = current {
        let line = match cur.verify_successor(signed.clone(), now) {
            Ok(_) => yes_no(successor_completion(signed, cur)),
            Err(TrustError::UnderThreshold { .. } | TrustError::Forged) => {
                yes_no(successor_completion(signed, cur))
            }
            Err(e) => format!("NO ({e})"),
        };
        let _ = writeln!(
            s,
            "  valid rotation of version {}: {line}",
            cur.body.version
        );
    }
    s
}
