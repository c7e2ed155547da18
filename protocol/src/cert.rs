//! Node certificates: the fleet key vouches for a node key (see
//! [`TrustRoot::check_certificate`](crate::trust::TrustRoot::check_certificate)).

use crate::ids::NodeId;
use crate::signing::{Domain, Signed, SignedBody};
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};

/// The signed body of a node certificate: the fleet key vouches for a node key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertBody {
    /// The certified node key.
    pub node: NodeId,
    /// Issue time.
    pub issued: UnixTime,
    /// Expiry.
    pub expires: UnixTime,
    /// Optional label (site, device class) for humans.
    pub label: String,
}

impl SignedBody for NodeCertBody {
    const DOMAIN: Domain = Domain::NodeCertificate;
    fn validate(&self) -> Result<(), String> {
        if self.expires <= self.issued {
            return Err("expires must be after issued".into());
        }
        if self.label.len() > 128 {
            return Err("label too long".into());
        }
        Ok(())
    }
}

/// A signed node certificate.
pub type SignedNodeCert = Signed<NodeCertBody>;
