//! Version manifests: what a publisher signs to release a version of a channel.
//!
//! A manifest names a channel, a strictly increasing version, the artifact (one or more
//! variants, each of one or more named files with content ids and chaining values), model
//! metadata, optional golden checks, the rollout plan, created/expires times and the manifest
//! it replaces. It travels as a [`Signed`] envelope; its id is the BLAKE3 hash of the signed
//! body bytes.

use crate::chunking::FileSpec;
pub use crate::ids::{Channel, MAX_CHANNEL_LEN};
use crate::ids::{ManifestId, NodeId};
use crate::rollout::RolloutPlan;
use crate::signing::{Domain, Signed, SignedBody, SignedError};
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};

/// Most variants in one artifact.
pub const MAX_VARIANTS: usize = 8;
/// Most files in one variant.
pub const MAX_FILES: usize = 32;
/// Most golden checks in one manifest.
pub const MAX_GOLDEN: usize = 16;
/// Longest short string (file names, variant names, tensor names).
pub const MAX_NAME_LEN: usize = 128;

/// Tensor element types (the KServe v2 datatypes that ONNX models use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// BOOL
    Bool,
    /// UINT8
    U8,
    /// UINT16
    U16,
    /// UINT32
    U32,
    /// UINT64
    U64,
    /// INT8
    I8,
    /// INT16
    I16,
    /// INT32
    I32,
    /// INT64
    I64,
    /// FP16
    F16,
    /// FP32
    F32,
    /// FP64
    F64,
    /// BYTES (variable length; no fixed element size)
    Bytes,
}

impl DType {
    /// Bytes per element, `None` for variable-length types.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 | DType::F16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
            DType::Bytes => return None,
        })
    }

    /// The KServe v2 datatype name.
    pub fn kserve_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "UINT8",
            DType::U16 => "UINT16",
            DType::U32 => "UINT32",
            DType::U64 => "UINT64",
            DType::I8 => "INT8",
            DType::I16 => "INT16",
            DType::I32 => "INT32",
            DType::I64 => "INT64",
            DType::F16 => "FP16",
            DType::F32 => "FP32",
            DType::F64 => "FP64",
            DType::Bytes => "BYTES",
        }
    }
}

/// An input or output of the model: name, element type, shape (`-1` = dynamic dimension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name in the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; `-1` for a dynamic one.
    pub shape: Vec<i64>,
}

/// Model metadata: inputs and outputs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Inputs.
    pub inputs: Vec<TensorSpec>,
    /// Outputs.
    pub outputs: Vec<TensorSpec>,
}

/// A concrete tensor: little-endian element bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    /// Tensor name.
    pub name: String,
    /// Element type (fixed-size types only).
    pub dtype: DType,
    /// Concrete dimensions.
    pub shape: Vec<u64>,
    /// `product(shape) * dtype.size()` little-endian bytes.
    pub data: Vec<u8>,
}

/// A golden check: run `inputs`, compare outputs with `expected` within `tolerance`
/// (absolute, per element, for floats; exact for integers and booleans).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GoldenCheck {
    /// Inputs to feed.
    pub inputs: Vec<TensorData>,
    /// Outputs expected.
    pub expected: Vec<TensorData>,
    /// Largest absolute difference accepted per float element.
    pub tolerance: f32,
}

/// What a device must offer to run a variant. Empty fields mean "no requirement".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRequirements {
    /// Device classes this variant is meant for (e.g. `weak-cpu`); empty = any.
    pub device_classes: Vec<String>,
    /// Minimum memory in MiB.
    pub min_memory_mib: u32,
    /// CPU features that must be present (e.g. `avx2`).
    pub cpu_features: Vec<String>,
}

/// A named file of a variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name (no path separators), e.g. `model.onnx`.
    pub name: String,
    /// Content id, size, chunk size and chaining values.
    pub spec: FileSpec,
}

/// One variant of the model (e.g. `fp32`, `int8`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// Variant name.
    pub name: String,
    /// Device requirements.
    pub requires: DeviceRequirements,
    /// Files: the first is the model graph.
    pub files: Vec<FileEntry>,
}

/// The artifact: one or more variants; the first is the default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Variants, default first.
    pub variants: Vec<Variant>,
}

/// What a device offers, for choosing a variant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceProfile {
    /// This device's class, if configured.
    pub device_class: Option<String>,
    /// Memory in MiB (0 = unknown, treated as enough).
    pub memory_mib: u32,
    /// CPU features present.
    pub cpu_features: Vec<String>,
}

impl Artifact {
    /// The variant this device should run: the first variant that names the device's class,
    /// else the first whose requirements the device meets, else the default.
    pub fn choose(&self, device: &DeviceProfile) -> usize {
        let meets = |v: &Variant| {
            (v.requires.min_memory_mib == 0
                || device.memory_mib == 0
                || device.memory_mib >= v.requires.min_memory_mib)
                && v.requires
                    .cpu_features
                    .iter()
                    .all(|f| device.cpu_features.contains(f))
        };
        if let Some(class) = &device.device_class
            && let Some(i) = self
                .variants
                .iter()
                .position(|v| v.requires.device_classes.contains(class) && meets(v))
        {
            return i;
        }
        self.variants
            .iter()
            .position(|v| v.requires.device_classes.is_empty() && meets(v))
            .or_else(|| self.variants.iter().position(meets))
            .unwrap_or(0)
    }
}

/// The signed body of a manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestBody {
    /// Channel this release belongs to.
    pub channel: Channel,
    /// Version, strictly increasing per channel, at least 1.
    pub version: u64,
    /// Files to fetch.
    pub artifact: Artifact,
    /// Model inputs and outputs.
    pub model: ModelMeta,
    /// Checks to run on the device before activation.
    pub golden: Vec<GoldenCheck>,
    /// Staged rollout plan.
    pub rollout: RolloutPlan,
    /// When the publisher created it; stage timing is anchored here.
    pub created: UnixTime,
    /// After this, nodes that have not yet accepted it refuse it.
    pub expires: UnixTime,
    /// The manifest this one replaces, if any.
    pub replaces: Option<ManifestId>,
}

impl ManifestBody {
    /// A release of one file (`model.onnx` in a variant `default` with no requirements),
    /// with no model metadata or golden checks, expiring 30 days after `created`: the
    /// shape of most test and demo releases.
    pub fn single_file(
        channel: Channel,
        version: u64,
        spec: FileSpec,
        rollout: RolloutPlan,
        created: UnixTime,
    ) -> ManifestBody {
        ManifestBody {
            channel,
            version,
            artifact: Artifact {
                variants: vec![Variant {
                    name: "default".into(),
                    requires: Default::default(),
                    files: vec![FileEntry {
                        name: "model.onnx".into(),
                        spec,
                    }],
                }],
            },
            model: ModelMeta::default(),
            golden: vec![],
            rollout,
            created,
            expires: created.plus(core::time::Duration::from_secs(30 * 24 * 3600)),
            replaces: None,
        }
    }
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("{what} must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if s.contains(['/', '\\', '\0']) || s == "." || s == ".." {
        return Err(format!("{what} {s:?} may not contain path separators"));
    }
    Ok(())
}

fn check_tensor(t: &TensorData) -> Result<(), String> {
    check_name("tensor name", &t.name)?;
    let Some(size) = t.dtype.size() else {
        return Err("golden tensors must have a fixed-size dtype".into());
    };
    let elems = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("golden tensor shape overflows")?;
    if elems.checked_mul(size as u64) != Some(t.data.len() as u64) {
        return Err(format!(
            "golden tensor {:?}: data length does not match shape",
            t.name
        ));
    }
    Ok(())
}

impl SignedBody for ManifestBody {
    const DOMAIN: Domain = Domain::Manifest;

    fn validate(&self) -> Result<(), String> {
        if self.version == 0 {
            return Err("version must be at least 1".into());
        }
        if self.expires <= self.created {
            return Err("expires must be after created".into());
        }
        let variants = &self.artifact.variants;
        if variants.is_empty() || variants.len() > MAX_VARIANTS {
            return Err(format!("an artifact has 1 to {MAX_VARIANTS} variants"));
        }
        for (i, v) in variants.iter().enumerate() {
            check_name("variant name", &v.name)?;
            if variants[..i].iter().any(|o| o.name == v.name) {
                return Err(format!("duplicate variant {:?}", v.name));
            }
            if v.files.is_empty() || v.files.len() > MAX_FILES {
                return Err(format!("a variant has 1 to {MAX_FILES} files"));
            }
            for (j, f) in v.files.iter().enumerate() {
                check_name("file name", &f.name)?;
                if v.files[..j].iter().any(|o| o.name == f.name) {
                    return Err(format!("duplicate file {:?}", f.name));
                }
                if f.spec.chunk_count() > u64::from(u32::MAX) {
                    return Err(format!("file {:?} has too many chunks", f.name));
                }
                f.spec
                    .check()
                    .map_err(|e| format!("file {:?}: {e}", f.name))?;
            }
        }
        for t in self.model.inputs.iter().chain(&self.model.outputs) {
            check_name("tensor name", &t.name)?;
            if t.shape.iter().any(|&d| d < -1) || t.shape.len() > 16 {
                return Err(format!("tensor {:?}: bad shape", t.name));
            }
        }
        if self.golden.len() > MAX_GOLDEN {
            return Err(format!("at most {MAX_GOLDEN} golden checks"));
        }
        for g in &self.golden {
            if !(g.tolerance.is_finite() && g.tolerance >= 0.0) {
                return Err("golden tolerance must be a finite non-negative number".into());
            }
            for t in g.inputs.iter().chain(&g.expected) {
                check_tensor(t)?;
            }
        }
        self.rollout.validate()
    }
}

/// A signed manifest as it travels.
pub type SignedManifest = Signed<ManifestBody>;

/// A decoded manifest: the envelope, its body and its id. Signatures are checked separately
/// against a trust root ([`crate::trust::TrustRoot::authorise_manifest`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The envelope exactly as received.
    pub signed: SignedManifest,
    /// The decoded body.
    pub body: ManifestBody,
    /// BLAKE3 of the body bytes.
    pub id: ManifestId,
}

impl Manifest {
    /// Decode the body of an envelope (canonical encoding and field rules).
    pub fn decode(signed: SignedManifest) -> Result<Self, SignedError> {
        signed.check_envelope()?;
        let body = signed.decode_body()?;
        let id = ManifestId(signed.body_hash());
        Ok(Manifest { signed, body, id })
    }

    /// Parse envelope bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignedError> {
        let (signed, body) = SignedManifest::from_bytes(bytes)?;
        let id = ManifestId(signed.body_hash());
        Ok(Manifest { signed, body, id })
    }

    /// The stage index this node falls in for this manifest (None: in no stage).
    pub fn stage_of(&self, node: &NodeId) -> Option<usize> {
        self.body.rollout.stage_of(crate::rollout::cohort_point(
            node,
            &self.body.channel,
            self.body.version,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(name: &str, classes: &[&str], mem: u32, cpu: &[&str]) -> Variant {
        Variant {
            name: name.into(),
            requires: DeviceRequirements {
                device_classes: classes.iter().map(|s| s.to_string()).collect(),
                min_memory_mib: mem,
                cpu_features: cpu.iter().map(|s| s.to_string()).collect(),
            },
            files: vec![],
        }
    }

    #[test]
    fn variant_choice_follows_device_requirements() {
        let a = Artifact {
            variants: vec![
                variant("fp32", &[], 2048, &["avx2"]),
                variant("int8", &["weak-cpu"], 0, &[]),
                variant("fp32-small", &[], 0, &[]),
            ],
        };
        let dev = |class: Option<&str>, mem: u32, cpu: &[&str]| DeviceProfile {
            device_class: class.map(String::from),
            memory_mib: mem,
            cpu_features: cpu.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            a.choose(&dev(Some("weak-cpu"), 512, &[])),
            1,
            "the class's own variant"
        );
        assert_eq!(
            a.choose(&dev(None, 4096, &["avx2"])),
            0,
            "strong device: the default"
        );
        assert_eq!(
            a.choose(&dev(None, 1024, &["avx2"])),
            2,
            "too little memory for fp32"
        );
        assert_eq!(a.choose(&dev(None, 4096, &[])), 2, "no avx2");
    }
}
