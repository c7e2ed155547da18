//! Node certificates: the fleet key vouches for a node key.

use crate::time::format_unix;
use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use pollen_protocol::signing::{Signed, SignedBody};
use pollen_protocol::trust::{NodeCertBody, SignedNodeCert, TrustRoot};
use pollen_protocol::{NodeId, UnixTime};
use std::fmt::Write as _;

/// Certify `node` with the fleet key `fleet`, valid from `issued` until `expires`, with a
/// label for humans (site, device class; at most 128 bytes).
pub fn certify(
    fleet: &SigningKey,
    node: NodeId,
    label: &str,
    issued: UnixTime,
    expires: UnixTime,
) -> Result<SignedNodeCert> {
    let body = NodeCertBody {
        node,
        issued,
        expires,
        label: label.to_string(),
    };
    body.validate()
        .map_err(|e| anyhow::anyhow!("invalid node certificate: {e}"))?;
    let signed = Signed::sign(&body, &[fleet]);
    signed
        .decode_body()
        .context("the signed certificate does not decode")?;
    Ok(signed)
}

/// Check a certificate as a node holding `trust` would at `now`. Errors when the trust
/// root names no fleet key (a certificate is then pointless) or the certificate fails.
pub fn check_against(cert: &SignedNodeCert, trust: &TrustRoot, now: UnixTime) -> Result<()> {
    let Some(fleet) = trust.body.fleet_key else {
        bail!(
            "trust root version {} names no fleet key: nodes need no certificate",
            trust.body.version
        );
    };
    let body = cert.decode_body().context("not a valid node certificate")?;
    trust
        .check_certificate(&body.node, Some(cert), now)
        .map_err(|e| {
            anyhow::anyhow!(
                "trust root version {} (fleet key {fleet}): {e}",
                trust.body.version
            )
        })
}

/// A human-readable description of a certificate.
pub fn describe(cert: &SignedNodeCert, body: &NodeCertBody, now: UnixTime) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "node certificate");
    let _ = writeln!(s, "  node:     {}", body.node);
    if !body.label.is_empty() {
        let _ = writeln!(s, "  label:    {}", body.label);
    }
    let _ = writeln!(s, "  issued:   {}", format_unix(body.issued));
    let state = if body.expires <= now {
        "EXPIRED"
    } else {
        "valid"
    };
    let _ = writeln!(s, "  expires:  {} ({state})", format_unix(body.expires));
    let valid = cert.valid_signers(|_| true);
    for e in cert.signatures() {
        let verdict = if valid.contains(&e.key) {
            "valid"
        } else {
            "INVALID signature"
        };
        let _ = writeln!(s, "  signed by {}  {verdict}", e.key);
    }
    s
}
