//! Restoring from disk: the order in which a driver hands the core what it persisted
//! after a restart, as one pure function both drivers call ([`commands`]).

use crate::bitfield::Bitfield;
use crate::cert::SignedNodeCert;
use crate::ids::{Channel, ContentId, ManifestId};
use crate::io::Command;
use crate::manifest::SignedManifest;
use crate::rollout::SignedInstruction;
use crate::trust::SignedTrustRoot;

/// What a driver keeps on disk for the core, read back at startup.
#[derive(Clone, Debug, Default)]
pub struct Persisted {
    /// Trust roots accepted so far, oldest first (each must succeed the one before).
    pub trust_roots: Vec<SignedTrustRoot>,
    /// This node's certificate (fleets).
    pub certificate: Option<SignedNodeCert>,
    /// Local version pins per channel (see [`Command::PinVersion`]).
    pub pinned_versions: Vec<(Channel, u64)>,
    /// Pinned releases (see [`Command::Pin`]).
    pub pinned: Vec<ManifestId>,
    /// Retained manifests with their versions, in any order.
    pub manifests: Vec<(u64, SignedManifest)>,
    /// Per channel: the highest version accepted and the active release, if any.
    pub channels: Vec<(Channel, u64, Option<ManifestId>)>,
    /// The latest operator instruction of each retained release.
    pub instructions: Vec<SignedInstruction>,
    /// Chunks held per file.
    pub chunks: Vec<(ContentId, Bitfield)>,
}

/// The commands that restore `p`, in order: trust roots and the certificate first (nothing
/// signed is accepted without them), pins before the manifests (so a restored pinned
/// release is not trimmed), manifests by version (each is checked against the ones
/// before), then per channel the highest version and the active release (only then are
/// channels trimmed), the instructions (they need their releases), and the held chunks.
pub fn commands(p: Persisted) -> Vec<Command> {
    let mut out = Vec::new();
    out.extend(p.trust_roots.into_iter().map(Command::RestoreTrustRoot));
    out.extend(p.certificate.map(Command::SetCertificate));
    out.extend(
        p.pinned_versions
            .into_iter()
            .map(|(channel, v)| Command::PinVersion {
                channel,
                version: Some(v),
            }),
    );
    out.extend(p.pinned.into_iter().map(Command::Pin));
    let mut manifests = p.manifests;
    manifests.sort_by_key(|(v, _)| *v);
    out.extend(manifests.into_iter().map(|(_, m)| Command::Restore(m)));
    for (channel, version, active) in p.channels {
        out.push(Command::SetHighest {
            channel: channel.clone(),
            version,
        });
        if let Some(manifest) = active {
            out.push(Command::SetActive { channel, manifest });
        }
    }
    out.extend(p.instructions.into_iter().map(Command::Instruct));
    out.extend(
        p.chunks
            .into_iter()
            .map(|(file, chunks)| Command::LocalChunks { file, chunks }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_and_active_follow_the_manifests_and_chunks_come_last() {
        let c = Channel::new("a").unwrap();
        let id = ManifestId([1; 32]);
        let file = ContentId([2; 32]);
        let cmds = commands(Persisted {
            pinned: vec![id],
            channels: vec![(c.clone(), 3, Some(id))],
            chunks: vec![(file, Bitfield::new(4))],
            ..Persisted::default()
        });
        assert!(matches!(cmds[0], Command::Pin(_)));
        assert!(matches!(&cmds[1], Command::SetHighest { version: 3, .. }));
        assert!(matches!(&cmds[2], Command::SetActive { manifest, .. } if *manifest == id));
        assert!(matches!(cmds[3], Command::LocalChunks { .. }));
        assert_eq!(cmds.len(), 4);
    }
}
