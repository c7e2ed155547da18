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
/// The file name that marks a variant's golden file: golden checks too large to travel in
/// the manifest, in the format of [`encode_golden_file`]. Reserved: no other file may
/// take it, and it is never the model graph (the first file).
pub const GOLDEN_FILE: &str = "golden.checks";
/// Largest golden file: a node reads it whole, and keeps its checks while the release
/// serves.
pub const MAX_GOLDEN_FILE: u64 = 64 << 20;
/// The first bytes of a golden file (format 1).
pub const GOLDEN_FILE_MAGIC: &[u8; 8] = b"PGOLDEN1";
/// The tokenizer of a language-model variant (Hugging Face `tokenizer.json`).
pub const LM_TOKENIZER_FILE: &str = "tokenizer.json";
/// The generation config of a language-model variant (special tokens, chat template,
/// context length, default sampling).
pub const LM_CONFIG_FILE: &str = "generation.json";
/// Most golden prompts of a language model.
pub const MAX_GOLDEN_PROMPTS: usize = 32;
/// Longest golden prompt, bytes.
pub const MAX_GOLDEN_PROMPT_LEN: usize = 8 * 1024;
/// Longest expected continuation of a golden prompt, tokens.
pub const MAX_GOLDEN_CONTINUATION: usize = 256;

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

    /// The short name used on the command line (`f32`, `i64`, `bool`, …; `bytes`).
    pub fn short_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bytes => "bytes",
        }
    }

    /// Every data type, in protocol order.
    pub const ALL: [DType; 13] = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::Bytes,
    ];

    /// The data type of a [`DType::short_name`].
    pub fn from_short_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.short_name() == s)
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

/// A golden check: run `inputs`, compare outputs with `expected`: integers and booleans
/// exactly, floats within `tolerance` plus the relative tolerance of
/// [`ServingSpec::golden_rtol`] (see there).
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
    /// Files: the first is the model graph; one named [`GOLDEN_FILE`], if any, holds
    /// golden checks for this variant.
    pub files: Vec<FileEntry>,
}

impl Variant {
    /// The model graph: the first file.
    pub fn model_file(&self) -> Option<&FileEntry> {
        self.files.first()
    }

    /// The variant's golden file ([`GOLDEN_FILE`]), if it has one.
    pub fn golden_file(&self) -> Option<&FileEntry> {
        self.files.iter().skip(1).find(|f| f.name == GOLDEN_FILE)
    }
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
    /// Checks to run on the device before activation. The checks of a release are these,
    /// then those in the golden file of the variant the node runs ([`Variant::golden_file`]),
    /// at most [`MAX_GOLDEN`] in all.
    pub golden: Vec<GoldenCheck>,
    /// Staged rollout plan.
    pub rollout: RolloutPlan,
    /// When the publisher created it; stage timing is anchored here.
    pub created: UnixTime,
    /// After this, nodes that have not yet accepted it refuse it.
    pub expires: UnixTime,
    /// The manifest this one replaces, if any.
    pub replaces: Option<ManifestId>,
    /// How nodes prepare and check the model (format 2). `None` is encoded exactly as
    /// manifests were before the field existed (format 1), so their ids and signatures
    /// stay valid and older nodes still accept them; a manifest that carries it is
    /// refused by older nodes as non-canonical rather than served without it.
    pub serving: Option<ServingSpec>,
}

/// Most declared input facts, and most constant inputs, in one manifest.
pub const MAX_INPUT_FACTS: usize = 32;
/// Most bytes of constant inputs in one manifest.
pub const MAX_CONST_BYTES: usize = 64 * 1024;
/// Longest name of a symbolic dimension.
pub const MAX_SYMBOL_LEN: usize = 32;

/// How nodes prepare a model for serving and check it, beyond the file itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServingSpec {
    /// Facts about inputs, applied before the model is analysed
    /// (`pollen publish --input x=f32[1,3,H,W]`).
    pub inputs: Vec<InputFact>,
    /// Inputs fixed for the deployment (`--const sr=16000`): the node feeds them, does not
    /// ask for them in requests, and refuses a request that gives a different value.
    pub consts: Vec<TensorData>,
    /// Per golden check (in order: the manifest's, then the golden file's), the relative
    /// tolerance of float outputs: an element passes when it equals the expected one
    /// (both NaN counts as equal) or `|got - want| <= tolerance + rtol * |want|`. Missing
    /// entries are 0. Integer and boolean outputs must match exactly.
    pub golden_rtol: Vec<f32>,
    /// The model is a causal language model, served on the OpenAI-compatible API
    /// (format 3). `None` encodes exactly as format 2.
    pub lm: Option<LmSpec>,
}

/// A causal language model: every variant holds the graph (first file, with past and
/// present key-value tensors), [`LM_TOKENIZER_FILE`] and [`LM_CONFIG_FILE`]; these are the
/// checks a node runs before it serves one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LmSpec {
    /// Prompts with the continuation a reference (the float model) gives greedily.
    pub golden_prompts: Vec<GoldenPrompt>,
    /// Per variant (in the artifact's order; one value stands for every variant), the
    /// fraction (0 to 1) of the expected tokens, over all golden prompts, that must be the
    /// model's most likely token when it is fed the prompt and the expected tokens before
    /// (teacher forcing, one token per step through the key-value cache). A quantised
    /// variant agrees less than the float one; the publisher states how much less is fine.
    pub min_agreement: Vec<f32>,
}

/// A golden prompt of a language model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoldenPrompt {
    /// Raw text, tokenised without added special tokens (the node adds the BOS token if
    /// the generation config says so); a chat prompt is given already rendered.
    pub prompt: String,
    /// Expected token ids after the prompt.
    pub continuation: Vec<u32>,
}

impl LmSpec {
    /// The agreement variant `variant` needs.
    pub fn min_agreement_of(&self, variant: usize) -> f32 {
        match self.min_agreement.as_slice() {
            [one] => *one,
            all => all.get(variant).copied().unwrap_or(1.0),
        }
    }

    fn validate(&self, variants: usize) -> Result<(), String> {
        if self.golden_prompts.len() > MAX_GOLDEN_PROMPTS {
            return Err(format!("at most {MAX_GOLDEN_PROMPTS} golden prompts"));
        }
        if !(self.min_agreement.len() == 1 || self.min_agreement.len() == variants)
            || self.min_agreement.iter().any(|m| !(0.0..=1.0).contains(m))
        {
            return Err("min_agreement: one fraction from 0 to 1, or one per variant".into());
        }
        for p in &self.golden_prompts {
            if p.prompt.is_empty() || p.prompt.len() > MAX_GOLDEN_PROMPT_LEN {
                return Err(format!(
                    "a golden prompt has 1 to {MAX_GOLDEN_PROMPT_LEN} bytes"
                ));
            }
            if p.continuation.is_empty() || p.continuation.len() > MAX_GOLDEN_CONTINUATION {
                return Err(format!(
                    "a golden continuation has 1 to {MAX_GOLDEN_CONTINUATION} tokens"
                ));
            }
        }
        Ok(())
    }
}

/// A declared input: its element type and dimensions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFact {
    /// Input name in the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub dims: Vec<Dim>,
}

/// One dimension of a declared input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// A named symbol: every dimension with the same name (in any input) has the same
    /// size in a request.
    Symbol(String),
    /// Any size, unrelated to the others.
    Any,
}

impl core::fmt::Display for Dim {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Any => f.write_str("?"),
        }
    }
}

impl core::fmt::Display for InputFact {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}={}[", self.name, self.dtype.short_name())?;
        for (i, d) in self.dims.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl core::str::FromStr for InputFact {
    type Err = String;

    /// `NAME=DTYPE[DIMS]`, e.g. `x=f32[1,3,H,W]` or `input=f32[?,576]`: dimensions are
    /// numbers, symbol names (a letter, then letters, digits or `_`) or `?`; `[]` is a
    /// scalar. DTYPE is one of `bool u8 u16 u32 u64 i8 i16 i32 i64 f16 f32 f64`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected NAME=DTYPE[DIMS], e.g. x=f32[1,3,H,W]");
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        let (dtype, dims) = rest.split_once('[').ok_or_else(bad)?;
        let dims = dims.strip_suffix(']').ok_or_else(bad)?;
        let dtype = DType::from_short_name(dtype.trim())
            .ok_or_else(|| format!("{s:?}: unknown element type {dtype:?}"))?;
        let dims = if dims.trim().is_empty() {
            Vec::new()
        } else {
            dims.split(',')
                .map(|d| {
                    let d = d.trim();
                    if d == "?" {
                        Ok(Dim::Any)
                    } else if let Ok(n) = d.parse::<u64>() {
                        Ok(Dim::Fixed(n))
                    } else if is_symbol(d) {
                        Ok(Dim::Symbol(d.into()))
                    } else {
                        Err(format!("{s:?}: bad dimension {d:?}"))
                    }
                })
                .collect::<Result<_, _>>()?
        };
        Ok(InputFact {
            name: name.trim().into(),
            dtype,
            dims,
        })
    }
}

fn is_symbol(d: &str) -> bool {
    let mut c = d.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && d.len() <= MAX_SYMBOL_LEN
}

impl ServingSpec {
    /// `golden`: how many golden checks the manifest may have (its own, or
    /// [`MAX_GOLDEN`] when a variant has a golden file).
    fn validate(&self, golden: usize) -> Result<(), String> {
        if self.inputs.len() > MAX_INPUT_FACTS || self.consts.len() > MAX_INPUT_FACTS {
            return Err(format!(
                "at most {MAX_INPUT_FACTS} declared inputs and {MAX_INPUT_FACTS} constants"
            ));
        }
        for (i, f) in self.inputs.iter().enumerate() {
            check_tensor_name("input name", &f.name)?;
            if self.inputs[..i].iter().any(|o| o.name == f.name) {
                return Err(format!("input {:?} declared twice", f.name));
            }
            if f.dtype.size().is_none() || f.dims.len() > 16 {
                return Err(format!("input {:?}: bad type or rank", f.name));
            }
            if f.dims
                .iter()
                .any(|d| matches!(d, Dim::Symbol(s) if !is_symbol(s)))
            {
                return Err(format!("input {:?}: bad symbol name", f.name));
            }
        }
        let mut bytes = 0usize;
        for (i, t) in self.consts.iter().enumerate() {
            check_tensor(t)?;
            if self.consts[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("constant {:?} given twice", t.name));
            }
            bytes = bytes.saturating_add(t.data.len());
        }
        if bytes > MAX_CONST_BYTES {
            return Err(format!("constants take at most {MAX_CONST_BYTES} bytes"));
        }
        if self.golden_rtol.len() > golden
            || self
                .golden_rtol
                .iter()
                .any(|r| !(r.is_finite() && *r >= 0.0))
        {
            return Err("one finite non-negative relative tolerance per golden check".into());
        }
        Ok(())
    }
}

/// Format 1 of [`ManifestBody`] (before `serving`), as it is decoded.
#[derive(Deserialize)]
struct ManifestBodyV1 {
    channel: Channel,
    version: u64,
    artifact: Artifact,
    model: ModelMeta,
    golden: Vec<GoldenCheck>,
    rollout: RolloutPlan,
    created: UnixTime,
    expires: UnixTime,
    replaces: Option<ManifestId>,
}

/// Format 2 of [`ManifestBody`] (before `serving.lm`), as it is decoded.
#[derive(Deserialize)]
struct ManifestBodyV2 {
    channel: Channel,
    version: u64,
    artifact: Artifact,
    model: ModelMeta,
    golden: Vec<GoldenCheck>,
    rollout: RolloutPlan,
    created: UnixTime,
    expires: UnixTime,
    replaces: Option<ManifestId>,
    serving: Option<ServingSpecV2>,
}

/// Format 2 of [`ServingSpec`], as it is decoded.
#[derive(Deserialize)]
struct ServingSpecV2 {
    inputs: Vec<InputFact>,
    consts: Vec<TensorData>,
    golden_rtol: Vec<f32>,
}

/// Format 2 of [`ManifestBody`], as it is encoded.
#[derive(Serialize)]
struct ManifestBodyV2Ref<'a> {
    channel: &'a Channel,
    version: u64,
    artifact: &'a Artifact,
    model: &'a ModelMeta,
    golden: &'a [GoldenCheck],
    rollout: &'a RolloutPlan,
    created: UnixTime,
    expires: UnixTime,
    replaces: &'a Option<ManifestId>,
    serving: Option<ServingSpecV2Ref<'a>>,
}

/// Format 2 of [`ServingSpec`], as it is encoded.
#[derive(Serialize)]
struct ServingSpecV2Ref<'a> {
    inputs: &'a [InputFact],
    consts: &'a [TensorData],
    golden_rtol: &'a [f32],
}

/// Format 1 of [`ManifestBody`], as it is encoded (borrowing the body).
#[derive(Serialize)]
struct ManifestBodyV1Ref<'a> {
    channel: &'a Channel,
    version: u64,
    artifact: &'a Artifact,
    model: &'a ModelMeta,
    golden: &'a [GoldenCheck],
    rollout: &'a RolloutPlan,
    created: UnixTime,
    expires: UnixTime,
    replaces: &'a Option<ManifestId>,
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
            serving: None,
        }
    }
}

/// A graph's tensor name: 1 to [`MAX_NAME_LEN`] bytes without NUL. Unlike file names
/// these may hold `/` (exporters name tensors `/model/conv1/Conv_output_0`).
fn check_tensor_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.contains('\0') {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} bytes without NUL"
        ));
    }
    Ok(())
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

fn check_golden(g: &GoldenCheck) -> Result<(), String> {
    if !(g.tolerance.is_finite() && g.tolerance >= 0.0) {
        return Err("golden tolerance must be a finite non-negative number".into());
    }
    for t in g.inputs.iter().chain(&g.expected) {
        check_tensor(t)?;
    }
    Ok(())
}

/// The bytes of a golden file ([`GOLDEN_FILE`]): [`GOLDEN_FILE_MAGIC`], then the postcard
/// encoding of the checks (a `Vec<GoldenCheck>`).
pub fn encode_golden_file(checks: &[GoldenCheck]) -> Vec<u8> {
    let mut out = GOLDEN_FILE_MAGIC.to_vec();
    // postcard encoding of our own types into a Vec cannot fail.
    out.extend(postcard::to_allocvec(checks).expect("postcard encoding into a Vec"));
    out
}

/// The checks of a golden file, checked like a manifest's own: at most [`MAX_GOLDEN`],
/// tolerances finite and non-negative, every tensor of a fixed-size type with as many
/// bytes as its shape says. The bytes are the publisher's (signed through the content id),
/// yet a bad file is an error, never a panic.
pub fn decode_golden_file(bytes: &[u8]) -> Result<Vec<GoldenCheck>, String> {
    let rest = bytes
        .strip_prefix(GOLDEN_FILE_MAGIC.as_slice())
        .ok_or("not a golden file (it does not start with PGOLDEN1)")?;
    let (checks, tail): (Vec<GoldenCheck>, &[u8]) =
        postcard::take_from_bytes(rest).map_err(|e| format!("malformed golden file: {e}"))?;
    if !tail.is_empty() {
        return Err(format!(
            "malformed golden file: {} bytes after the checks",
            tail.len()
        ));
    }
    if checks.len() > MAX_GOLDEN {
        return Err(format!("at most {MAX_GOLDEN} golden checks"));
    }
    for g in &checks {
        check_golden(g)?;
    }
    Ok(checks)
}

fn check_tensor(t: &TensorData) -> Result<(), String> {
    check_tensor_name("tensor name", &t.name)?;
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
            if v.files[0].name == GOLDEN_FILE {
                return Err(format!(
                    "variant {:?}: the first file is the model graph, it cannot be {GOLDEN_FILE}",
                    v.name
                ));
            }
            if let Some(g) = v.golden_file() {
                if g.spec.size > MAX_GOLDEN_FILE {
                    return Err(format!(
                        "variant {:?}: {GOLDEN_FILE} has {} bytes, at most {MAX_GOLDEN_FILE}",
                        v.name, g.spec.size
                    ));
                }
                // A node that predates golden files would serve without these checks;
                // format 2 is refused by such nodes.
                if self.serving.is_none() {
                    return Err(format!(
                        "variant {:?} has a {GOLDEN_FILE}: the manifest needs `serving` (format 2)",
                        v.name
                    ));
                }
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
            check_tensor_name("tensor name", &t.name)?;
            if t.shape.iter().any(|&d| d < -1) || t.shape.len() > 16 {
                return Err(format!("tensor {:?}: bad shape", t.name));
            }
        }
        if self.golden.len() > MAX_GOLDEN {
            return Err(format!("at most {MAX_GOLDEN} golden checks"));
        }
        for g in &self.golden {
            check_golden(g)?;
        }
        if let Some(s) = &self.serving {
            let file = variants.iter().any(|v| v.golden_file().is_some());
            s.validate(if file { MAX_GOLDEN } else { self.golden.len() })?;
            if let Some(lm) = &s.lm {
                lm.validate(variants.len())?;
                for v in variants {
                    for name in [LM_TOKENIZER_FILE, LM_CONFIG_FILE] {
                        if !v.files.iter().skip(1).any(|f| f.name == name) {
                            return Err(format!(
                                "variant {:?} of a language model has no {name}",
                                v.name
                            ));
                        }
                    }
                }
            }
        }
        self.rollout.validate()
    }

    /// Format 1 bytes without `serving`, format 2 with it, format 3 with a language model.
    fn encode(&self) -> Vec<u8> {
        let bytes = match &self.serving {
            Some(s) if s.lm.is_some() => postcard::to_allocvec(self),
            Some(s) => postcard::to_allocvec(&ManifestBodyV2Ref {
                channel: &self.channel,
                version: self.version,
                artifact: &self.artifact,
                model: &self.model,
                golden: &self.golden,
                rollout: &self.rollout,
                created: self.created,
                expires: self.expires,
                replaces: &self.replaces,
                serving: Some(ServingSpecV2Ref {
                    inputs: &s.inputs,
                    consts: &s.consts,
                    golden_rtol: &s.golden_rtol,
                }),
            }),
            None => postcard::to_allocvec(&ManifestBodyV1Ref {
                channel: &self.channel,
                version: self.version,
                artifact: &self.artifact,
                model: &self.model,
                golden: &self.golden,
                rollout: &self.rollout,
                created: self.created,
                expires: self.expires,
                replaces: &self.replaces,
            }),
        };
        // postcard encoding of our own types into a Vec cannot fail.
        bytes.expect("postcard encoding into a Vec")
    }

    /// Format 3, else 2, else 1; either way the bytes must be exactly what
    /// [`SignedBody::encode`] gives (so a format-2 body with `serving: None`, or a
    /// format-3 one with `lm: None`, is refused).
    fn decode(bytes: &[u8]) -> Result<Self, SignedError> {
        let body = match postcard::from_bytes::<ManifestBody>(bytes) {
            Ok(b) => b,
            Err(_) if postcard::from_bytes::<ManifestBodyV2>(bytes).is_ok() => {
                let v2: ManifestBodyV2 = postcard::from_bytes(bytes)
                    .map_err(|e| SignedError::Malformed(e.to_string()))?;
                ManifestBody {
                    channel: v2.channel,
                    version: v2.version,
                    artifact: v2.artifact,
                    model: v2.model,
                    golden: v2.golden,
                    rollout: v2.rollout,
                    created: v2.created,
                    expires: v2.expires,
                    replaces: v2.replaces,
                    serving: v2.serving.map(|s| ServingSpec {
                        inputs: s.inputs,
                        consts: s.consts,
                        golden_rtol: s.golden_rtol,
                        lm: None,
                    }),
                }
            }
            Err(_) => {
                let v1: ManifestBodyV1 = postcard::from_bytes(bytes)
                    .map_err(|e| SignedError::Malformed(e.to_string()))?;
                ManifestBody {
                    channel: v1.channel,
                    version: v1.version,
                    artifact: v1.artifact,
                    model: v1.model,
                    golden: v1.golden,
                    rollout: v1.rollout,
                    created: v1.created,
                    expires: v1.expires,
                    replaces: v1.replaces,
                    serving: None,
                }
            }
        };
        if body.encode() != bytes {
            return Err(SignedError::NonCanonical);
        }
        Ok(body)
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
    use crate::chunking::{ChunkSize, spec_for_bytes};
    use alloc::string::ToString;
    use alloc::vec;

    fn body(serving: Option<ServingSpec>) -> ManifestBody {
        let spec = spec_for_bytes(&[1; 100], ChunkSize::new(16_384).expect("valid"));
        let mut b = ManifestBody::single_file(
            Channel::new("audio.vad").expect("valid"),
            3,
            spec,
            RolloutPlan::immediate(),
            UnixTime::from_secs(1_000),
        );
        b.serving = serving;
        b
    }

    fn spec() -> ServingSpec {
        ServingSpec {
            inputs: vec!["input=f32[?,576]".parse().expect("fact")],
            consts: vec![TensorData {
                name: "sr".into(),
                dtype: DType::I64,
                shape: vec![],
                data: 16_000i64.to_le_bytes().to_vec(),
            }],
            golden_rtol: vec![],
            lm: None,
        }
    }

    /// Manifests signed before `serving` existed keep their bytes, ids and signatures:
    /// without it a body encodes exactly as format 1 did (no trailing option tag); with
    /// it, it decodes back to itself; a format-2 body that spells out `None` is not
    /// canonical.
    #[test]
    fn format_1_bodies_keep_their_bytes_and_format_2_round_trips() {
        let v1 = body(None);
        let bytes = v1.encode();
        let derived = postcard::to_allocvec(&v1).expect("encode");
        assert_eq!(
            derived.len(),
            bytes.len() + 1,
            "format 2 adds only the option tag"
        );
        assert_eq!(&derived[..bytes.len()], &bytes[..]);
        assert_eq!(ManifestBody::decode(&bytes).expect("format 1"), v1);
        assert!(matches!(
            ManifestBody::decode(&derived),
            Err(SignedError::NonCanonical)
        ));
        let v2 = body(Some(spec()));
        let bytes = v2.encode();
        assert_eq!(ManifestBody::decode(&bytes).expect("format 2"), v2);
        let signed = Signed::sign(&v2, &[&ed25519_dalek::SigningKey::from_bytes(&[3; 32])]);
        assert_eq!(signed.decode_body().expect("signed format 2"), v2);
    }

    /// A language model is format 3: format-2 bodies keep their bytes (the `lm` tag is
    /// not written without one), format 3 round trips, and spelling out `lm: None` is
    /// not canonical.
    #[test]
    fn format_2_bodies_keep_their_bytes_and_format_3_round_trips() {
        let v2 = body(Some(spec()));
        let bytes = v2.encode();
        let derived = postcard::to_allocvec(&v2).expect("encode");
        assert_eq!(derived.len(), bytes.len() + 1, "format 3 adds only the tag");
        assert_eq!(&derived[..bytes.len()], &bytes[..]);
        assert!(matches!(
            ManifestBody::decode(&derived),
            Err(SignedError::NonCanonical)
        ));
        let mut v3 = body(Some(ServingSpec {
            lm: Some(LmSpec {
                golden_prompts: vec![GoldenPrompt {
                    prompt: "<|im_start|>user\nHi<|im_end|>\n".into(),
                    continuation: vec![1, 2, 3],
                }],
                min_agreement: vec![0.9],
            }),
            ..spec()
        }));
        assert!(
            v3.validate().unwrap_err().contains("tokenizer.json"),
            "a language model's variants carry its tokenizer"
        );
        let extra = v3.artifact.variants[0].files[0].clone();
        for name in [LM_TOKENIZER_FILE, LM_CONFIG_FILE] {
            let mut f = extra.clone();
            f.name = name.into();
            v3.artifact.variants[0].files.push(f);
        }
        v3.validate().expect("valid");
        let bytes = v3.encode();
        assert_eq!(ManifestBody::decode(&bytes).expect("format 3"), v3);
        let mut bad = v3.clone();
        if let Some(lm) = bad.serving.as_mut().and_then(|s| s.lm.as_mut()) {
            lm.min_agreement = vec![1.5];
        }
        assert!(bad.validate().is_err());
    }

    #[test]
    fn input_facts_parse_and_print() {
        for s in [
            "x=f32[1,3,H,W]",
            "input=f32[?,576]",
            "sr=i64[]",
            "mask=bool[batch,seq_len]",
        ] {
            let f: InputFact = s.parse().expect(s);
            assert_eq!(f.to_string(), s);
        }
        let f: InputFact = "x=u8[2,?,N]".parse().expect("fact");
        assert_eq!(f.dims, [Dim::Fixed(2), Dim::Any, Dim::Symbol("N".into())]);
        for bad in [
            "x",
            "x=f32",
            "x=f32[1",
            "x=float[1]",
            "x=f32[-1]",
            "x=f32[1x]",
            "x=f32[a b]",
        ] {
            assert!(bad.parse::<InputFact>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serving_specs_are_bounded() {
        assert!(body(Some(spec())).validate().is_ok());
        let mut s = spec();
        s.consts[0].data.pop();
        assert!(
            body(Some(s)).validate().is_err(),
            "data does not match the shape"
        );
        let mut s = spec();
        s.inputs.push(s.inputs[0].clone());
        assert!(body(Some(s)).validate().is_err(), "declared twice");
        let mut s = spec();
        s.consts[0] = TensorData {
            name: "big".into(),
            dtype: DType::U8,
            shape: vec![MAX_CONST_BYTES as u64 + 1],
            data: vec![0; MAX_CONST_BYTES + 1],
        };
        assert!(body(Some(s)).validate().is_err(), "too many constant bytes");
        let mut s = spec();
        s.golden_rtol = vec![0.1];
        assert!(
            body(Some(s)).validate().is_err(),
            "more tolerances than checks"
        );
    }

    fn golden_check(tolerance: f32) -> GoldenCheck {
        GoldenCheck {
            inputs: vec![TensorData {
                name: "x".into(),
                dtype: DType::I64,
                shape: vec![2],
                data: vec![1; 16],
            }],
            expected: vec![],
            tolerance,
        }
    }

    #[test]
    fn golden_files_round_trip_and_are_checked_like_manifests() {
        let checks = vec![golden_check(0.5), golden_check(0.0)];
        let bytes = encode_golden_file(&checks);
        assert!(bytes.starts_with(GOLDEN_FILE_MAGIC));
        assert_eq!(decode_golden_file(&bytes), Ok(checks.clone()));
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_golden_file(&long).is_err(), "trailing bytes");
        assert!(
            decode_golden_file(&bytes[..bytes.len() - 1]).is_err(),
            "cut"
        );
        assert!(decode_golden_file(&bytes[1..]).is_err(), "no magic");
        assert!(decode_golden_file(&encode_golden_file(&[golden_check(-1.0)])).is_err());
        let mut short = golden_check(0.0);
        short.inputs[0].data.pop();
        assert!(decode_golden_file(&encode_golden_file(&[short])).is_err());
        let many = vec![golden_check(0.0); MAX_GOLDEN + 1];
        assert!(decode_golden_file(&encode_golden_file(&many)).is_err());
        // Graph tensor names may hold `/`, unlike file names.
        let mut slash = golden_check(0.0);
        slash.inputs[0].name = "/model/conv1/Conv_output_0".into();
        assert!(decode_golden_file(&encode_golden_file(&[slash.clone()])).is_ok());
        let mut b = body(None);
        b.golden = vec![slash.clone()];
        assert!(b.validate().is_ok());
        slash.inputs[0].name = "a\0b".into();
        assert!(decode_golden_file(&encode_golden_file(&[slash])).is_err());
    }

    #[test]
    fn a_golden_file_is_never_the_model_needs_format_2_and_is_bounded() {
        let golden = |size: usize| FileEntry {
            name: GOLDEN_FILE.into(),
            spec: spec_for_bytes(&vec![0; size], ChunkSize::new(16_384).expect("valid")),
        };
        let mut b = body(Some(ServingSpec::default()));
        b.artifact.variants[0].files.push(golden(100));
        assert!(b.validate().is_ok());
        let v = &b.artifact.variants[0];
        assert_eq!(v.model_file().map(|f| f.name.as_str()), Some("model.onnx"));
        assert_eq!(v.golden_file().map(|f| f.name.as_str()), Some(GOLDEN_FILE));
        // Relative tolerances for the file's checks, which the manifest cannot count.
        b.serving.as_mut().expect("serving").golden_rtol = vec![1e-3; MAX_GOLDEN];
        assert!(b.validate().is_ok());
        b.serving.as_mut().expect("serving").golden_rtol = vec![1e-3; MAX_GOLDEN + 1];
        assert!(b.validate().is_err());
        let mut old = b.clone();
        old.serving = None;
        assert!(
            old.validate().is_err(),
            "format 1 cannot carry a golden file"
        );
        let mut first = body(Some(ServingSpec::default()));
        first.artifact.variants[0].files.insert(0, golden(100));
        assert!(first.validate().is_err(), "the golden file as the model");
        assert_eq!(first.artifact.variants[0].golden_file(), None);
        let mut big = body(Some(ServingSpec::default()));
        let mut g = golden(10);
        g.spec.size = MAX_GOLDEN_FILE + 1;
        big.artifact.variants[0].files.push(g);
        let e = big.validate().expect_err("too large");
        assert!(e.contains("golden.checks has"), "{e}");
    }

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
