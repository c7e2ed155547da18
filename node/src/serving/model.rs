//! A model version loaded in tract: load, optimise and warm it ([`LoadedModel::load`],
//! blocking), and run it on KServe tensors ([`LoadedModel::infer`], [`LoadedModel::run`]),
//! checking names, data types and shapes first.
//!
//! # How a model is prepared
//!
//! 1. The ONNX bytes are adjusted ([`super::onnx::prepare`]): the manifest's constant
//!    inputs become initializers, an `If` they decide becomes the branch it takes, and a
//!    `ZipMap` at a graph output is replaced by the probability tensor it wraps.
//! 2. Every input gets a full fact: the publisher's declaration (`--input x=f32[1,3,H,W]`)
//!    if the manifest has one, else what the file declares. A named dimension is a tract
//!    symbol of that name; an unnamed one (`?`) a fresh symbol.
//! 3. tract analyses and optimises the model with its symbols ([`Engine::Symbolic`]): one
//!    runnable serves every shape. Tried again without the file's intermediate shape hints
//!    (`value_info`) when they contradict tract's own inference.
//! 4. Where tract cannot optimise with symbols, the model is prepared per concrete input
//!    shape when a request or a golden check brings one ([`Engine::PerShape`], a bounded
//!    [`ShapeCache`]; preparations run on threads of their own, see [`super::shapes`]).
//!    At load, probes with every symbol at 1, then 64 (analysis only) find operators
//!    tract lacks; a model no probe and no golden check shows to work is refused.
//!
//! A refusal names the node, the operator and what would make the model work.
//!
//! # Memory
//!
//! Sizes are checked before anything is allocated: the file against the budget at load;
//! the inputs and outputs of every run against the budget before the run (outputs from
//! the symbolic facts evaluated at the request's sizes, or from the prepared shape's
//! facts); and the shape cache holds at most `budget / file size` prepared copies.

use super::golden::GoldenSet;
use super::health::HealthWindow;
use super::kserve::{DATATYPES, Tensor};
use super::onnx::{self, Graph, OnnxDim, ValueInfo};
use super::shapes::{CacheError, ShapeCache};
use pollen_protocol::ids::ManifestId;
use pollen_protocol::manifest::{DType, Dim as DeclDim, GoldenCheck, ServingSpec, TensorData};
use pollen_protocol::rollout::ErrorClass;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tract::prelude::*;

/// Default bound of the per-shape cache of a model ([`ServingLimits::specialisations`]).
pub const DEFAULT_SPECIALISATIONS: usize = 8;

/// Default longest wait of a request for its shape's preparation
/// ([`ServingLimits::prepare_wait`]): enough to optimise the OCR models of the corpus
/// (0.3–3 s), short enough that a client is told to retry rather than left hanging.
pub const DEFAULT_PREPARE_WAIT: Duration = Duration::from_secs(10);

/// What bounds a model's serving on this node.
#[derive(Clone, Debug)]
pub struct ServingLimits {
    /// Bytes a model may take: its file, the tensors of one run, its prepared copies.
    pub budget: u64,
    /// Most input shapes a model prepared per shape keeps (least recently used out).
    pub specialisations: usize,
    /// Longest a request waits for its shape's preparation before a 503.
    pub prepare_wait: Duration,
}

impl ServingLimits {
    /// `budget` bytes, the default cache bound and wait.
    pub fn new(budget: u64) -> Self {
        ServingLimits {
            budget,
            specialisations: DEFAULT_SPECIALISATIONS,
            prepare_wait: DEFAULT_PREPARE_WAIT,
        }
    }
}

/// Give the memory freed after loading a model back to the system. Optimising a model
/// allocates several copies of its weights; glibc keeps freed heap memory for reuse, so
/// without this a node's resident memory stays at the peak of the load.
#[allow(unsafe_code)]
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// glibc's malloc tunable that asks for transparent huge pages (`madvise`) on the memory
/// malloc takes from the kernel.
const HUGE_PAGES_TUNABLE: &str = "glibc.malloc.hugetlb";

/// Make this process one whose malloc backs its memory with transparent huge pages, by
/// executing itself again with `glibc.malloc.hugetlb=1` added to `GLIBC_TUNABLES` (glibc
/// reads its tunables only when a process starts). Call it first thing, before the
/// process has done anything it would do twice.
///
/// Why: a language model reads every weight once per token, and with 4 KiB pages a
/// third of a gigabyte of weights costs a TLB miss every 4 KiB. SmolLM2 int8 decodes 5-8%
/// faster with it (40.5 against 43.6 tokens/s at one thread); the resident memory after a
/// load grows by about 20 MiB (pages rounded to 2 MiB). On a system whose transparent
/// huge pages are `never`, or with another libc, the tunable does nothing.
///
/// Returns (the process runs on as it is) when `GLIBC_TUNABLES` already names the tunable
/// (`glibc.malloc.hugetlb=0` turns it off), when this is not Linux with glibc, or when the
/// executable cannot be executed again (its file was replaced, say).
pub fn restart_with_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if current.contains(HUGE_PAGES_TUNABLE) {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let tunables = if current.is_empty() {
            format!("{HUGE_PAGES_TUNABLE}=1")
        } else {
            format!("{current}:{HUGE_PAGES_TUNABLE}=1")
        };
        let e = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", tunables)
            .exec();
        eprintln!("warning: running without huge pages: executing this program again failed: {e}");
    }
}

/// An input or output of a loaded model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoSpec {
    /// Name in the graph.
    pub name: String,
    /// Element type.
    pub datatype: DType,
    /// Dimensions, -1 for a symbolic one.
    pub shape: Vec<i64>,
}

/// Why serving a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The request does not fit the model (a 400).
    #[error("{0}")]
    BadInput(String),
    /// The model failed while running (a 500).
    #[error("inference failed: {0}")]
    Runtime(String),
    /// The runtime panicked (a 500; repeated panics are a crash loop).
    #[error("inference failed: the runtime panicked")]
    Panicked,
    /// The model is still being prepared for the request's input shapes (a 503: retry).
    #[error("{0}")]
    Preparing(String),
}

/// One dimension of an input as the model is prepared with it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Extent {
    Fixed(usize),
    /// A tract symbol: dimensions with the same name take the same size.
    Symbol(String),
}

/// How an input is fed: element type and dimensions.
#[derive(Clone, Debug)]
struct InputFact {
    name: String,
    dtype: DType,
    dims: Vec<Extent>,
}

impl InputFact {
    /// The tract fact spec: `1,3,H,W,f32` (symbols kept) or with `shape` (concrete).
    fn spec(&self, shape: Option<&[usize]>) -> String {
        let mut parts: Vec<String> = match shape {
            Some(s) => s.iter().map(|d| d.to_string()).collect(),
            None => self
                .dims
                .iter()
                .map(|d| match d {
                    Extent::Fixed(n) => n.to_string(),
                    Extent::Symbol(s) => s.clone(),
                })
                .collect(),
        };
        parts.push(self.dtype.short_name().to_string());
        parts.join(",")
    }

    fn io_spec(&self) -> IoSpec {
        IoSpec {
            name: self.name.clone(),
            datatype: self.dtype,
            shape: self
                .dims
                .iter()
                .map(|d| match d {
                    Extent::Fixed(n) => *n as i64,
                    Extent::Symbol(_) => -1,
                })
                .collect(),
        }
    }

    fn is_fixed(&self) -> bool {
        self.dims.iter().all(|d| matches!(d, Extent::Fixed(_)))
    }

    /// `--input` as a publisher would write it for this input.
    fn declaration(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                Extent::Fixed(n) => n.to_string(),
                Extent::Symbol(s) if is_publish_symbol(s) && !s.starts_with("unk_") => s.clone(),
                Extent::Symbol(_) => "?".into(),
            })
            .collect();
        format!(
            "{}={}[{}]",
            self.name,
            self.dtype.short_name(),
            dims.join(",")
        )
    }
}

/// A model prepared for one set of concrete input shapes.
struct Shaped {
    runnable: Runnable,
    outputs: Vec<IoSpec>,
}

/// Plans prepared per input shape beside a symbolic one (see [`Engine::Symbolic`]).
struct Faster {
    cache: ShapeCache<Shaped>,
    /// Shapes requested once and not prepared (most recent last, at most [`SEEN`]): a
    /// shape is prepared when it comes a second time, so one-off shapes cost no
    /// preparation.
    seen: Mutex<VecDeque<Vec<Vec<usize>>>>,
}

/// Shapes [`Faster`] remembers having seen once.
const SEEN: usize = 64;

impl Faster {
    fn new(cache: ShapeCache<Shaped>) -> Self {
        Faster {
            cache,
            seen: Mutex::new(VecDeque::new()),
        }
    }

    /// The plan for `shapes` if it is prepared; otherwise start preparing it in the
    /// background if this shape came before, and give `None`.
    fn plan(&self, shapes: &[Vec<usize>]) -> Option<Arc<Shaped>> {
        if let Some(p) = self.cache.ready(shapes) {
            return Some(p);
        }
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = seen.iter().position(|s| s == shapes) {
            seen.remove(at);
            drop(seen);
            return self.cache.get(shapes, Some(Duration::ZERO)).ok();
        }
        if seen.len() >= SEEN {
            seen.pop_front();
        }
        seen.push_back(shapes.to_vec());
        None
    }
}

/// How a loaded model runs.
enum Engine {
    /// One runnable for every shape, symbols kept; output facts to size a run before it.
    Symbolic {
        runnable: Runnable,
        output_facts: Vec<Fact>,
        /// Set when plans prepared per input shape measured faster at load (see
        /// [`LoadedModel::prefer_shaped`]): a request whose shapes have a plan runs it,
        /// others run the symbolic plan while theirs is prepared in the background.
        faster: Option<Faster>,
    },
    /// Prepared per concrete input shapes.
    PerShape(ShapeCache<Shaped>),
}

/// A model version ready to serve.
pub struct LoadedModel {
    /// Channel (the model name).
    pub channel: String,
    /// Manifest version.
    pub version: u64,
    /// Manifest id.
    pub manifest: ManifestId,
    /// Inputs a request gives, in graph order (constant inputs are not among them).
    pub inputs: Vec<IoSpec>,
    /// Outputs, in graph order.
    pub outputs: Vec<IoSpec>,
    /// Inputs fixed by the manifest (`--const`): not asked for; a request may repeat them
    /// with the same value only.
    pub constants: Vec<TensorData>,
    /// What clients should know about some outputs (a ZipMap taken out), by output name.
    pub notes: BTreeMap<String, String>,
    /// Requests, errors and latency since the last health report.
    pub health: HealthWindow,
    facts: Vec<InputFact>,
    engine: Engine,
    limits: ServingLimits,
    /// The first operator tract lacks that a preparation met (per-shape models meet them
    /// only once shapes are known).
    unsupported: Arc<Mutex<Option<String>>>,
    /// The golden checks it passed at activation ([`LoadedModel::keep_golden`]), run again
    /// to decide who is at fault when a request fails ([`LoadedModel::at_fault`]).
    golden: GoldenSet,
    /// The latest verdict of such a re-run: when, and whether the model failed it.
    recheck: Mutex<Option<(Instant, bool)>>,
    /// The language model over this graph, for a release that is one.
    lm: Option<super::lm::LmModel>,
}

/// A verdict of [`LoadedModel::at_fault`] stands this long before the golden checks run
/// again: a client that keeps sending bad input costs at most one re-run per interval.
const RECHECK_INTERVAL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("channel", &self.channel)
            .field("version", &self.version)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("per_shape", &matches!(self.engine, Engine::PerShape(_)))
            .finish()
    }
}

/// The tract element type of a data type; `None` for BYTES, which tract models do not take.
fn to_tract(d: DType) -> Option<DatumType> {
    Some(match d {
        DType::Bool => DatumType::Bool,
        DType::U8 => DatumType::U8,
        DType::U16 => DatumType::U16,
        DType::U32 => DatumType::U32,
        DType::U64 => DatumType::U64,
        DType::I8 => DatumType::I8,
        DType::I16 => DatumType::I16,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::F16 => DatumType::F16,
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        _ => return None,
    })
}

/// The data type of a tract element type, if the protocol has one.
fn from_tract(dt: DatumType) -> Option<DType> {
    DATATYPES.into_iter().find(|d| to_tract(*d) == Some(dt))
}

fn io_spec(name: String, fact: &Fact) -> Result<IoSpec, String> {
    let dt = fact.datum_type().map_err(|e| e.to_string())?;
    let datatype =
        from_tract(dt).ok_or_else(|| format!("{name}: unsupported element type {dt:?}"))?;
    let shape = fact
        .dims()
        .map_err(|e| e.to_string())?
        .map(|d| d.to_int64().unwrap_or(-1))
        .collect();
    Ok(IoSpec {
        name,
        datatype,
        shape,
    })
}

/// The shape a warm-up run uses: every symbolic dimension at 1.
fn warm_shape(shape: &[i64]) -> impl Iterator<Item = usize> + '_ {
    shape.iter().map(|d| if *d < 0 { 1 } else { *d as usize })
}

/// Bytes of a warm-up tensor of `s` (symbolic dimensions at 1), or `None` past `u64`.
fn tensor_bytes(s: &IoSpec) -> Option<u64> {
    shape_bytes(&warm_shape(&s.shape).collect::<Vec<_>>(), s.datatype)
}

/// Bytes of a tensor of `shape` and `dtype`, or `None` past `u64`.
fn shape_bytes(shape: &[usize], dtype: DType) -> Option<u64> {
    let elements = shape
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(*d as u64))?;
    elements.checked_mul(dtype.size().unwrap_or(1) as u64)
}

/// The inputs and outputs of a warm-up run fit in `budget` bytes together.
fn check_budget(inputs: &[IoSpec], outputs: &[IoSpec], budget: u64) -> Result<(), String> {
    let sized = |kind, s: &IoSpec| (kind, s.name.clone(), s.shape.clone(), tensor_bytes(s));
    let all: Vec<_> = inputs
        .iter()
        .map(|s| sized("input", s))
        .chain(outputs.iter().map(|s| sized("output", s)))
        .collect();
    check_sizes(&all, budget)
}

/// Tensors `(kind, name, shape, bytes)` fit in `budget` bytes together.
fn check_sizes(all: &[(&str, String, Vec<i64>, Option<u64>)], budget: u64) -> Result<(), String> {
    let mut total = 0u64;
    for (kind, name, shape, bytes) in all {
        let sum = bytes.and_then(|b| total.checked_add(b));
        total = sum.unwrap_or(u64::MAX);
        if sum.is_none() || total > budget {
            return Err(format!(
                "{kind} '{name}' of shape {shape:?} needs {} bytes: the model's tensors exceed \
                 the model memory budget of {budget} bytes",
                bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
            ));
        }
    }
    Ok(())
}

/// A dimension name tract reads as one symbol.
fn is_tract_symbol(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == '.')
        && !s.ends_with('.')
}

/// A symbol `pollen publish --input` takes (a letter, then letters, digits or `_`).
fn is_publish_symbol(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// A fresh symbol for dimension `axis` of input `input`.
fn fresh_symbol(input: &str, axis: usize) -> String {
    let clean: String = input
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("unk_{clean}_{axis}")
}

/// The fact of every input of `graph` (constants aside): the manifest's declaration, else
/// the file's. Errors name the input.
fn input_facts(graph: &Graph, spec: &ServingSpec) -> Result<Vec<InputFact>, String> {
    let fed: Vec<&ValueInfo> = graph
        .inputs
        .iter()
        .filter(|i| !spec.consts.iter().any(|c| c.name == i.name))
        .collect();
    if let Some(d) = spec.inputs.iter().find(|d| graph.input(&d.name).is_none()) {
        return Err(format!(
            "declared input '{}' is not an input of the model (its inputs: {})",
            d.name,
            fed.iter()
                .map(|i| format!("'{}'", i.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(d) = spec
        .inputs
        .iter()
        .find(|d| spec.consts.iter().any(|c| c.name == d.name))
    {
        return Err(format!(
            "input '{}' is declared both as a fact and as a constant",
            d.name
        ));
    }
    fed.into_iter()
        .map(|vi| {
            let file_dtype = vi.elem.map(|e| {
                onnx::dtype_of_elem(e).ok_or_else(|| {
                    format!(
                        "input '{}' is {}: that element type is not supported (Pollen \
                         serves bool, integers, f16, f32 and f64)",
                        vi.name,
                        onnx::elem_name(e)
                    )
                })
            });
            if let Some(d) = spec.inputs.iter().find(|d| d.name == vi.name) {
                if let Some(Ok(ft)) = &file_dtype
                    && *ft != d.dtype
                {
                    return Err(format!(
                        "input '{}' is declared {} but the model takes {}",
                        d.name,
                        d.dtype.short_name(),
                        ft.short_name()
                    ));
                }
                if let Some(fd) = &vi.dims
                    && fd.len() != d.dims.len()
                {
                    return Err(format!(
                        "input '{}' is declared with {} dimensions but the model's has {} ({})",
                        d.name,
                        d.dims.len(),
                        fd.len(),
                        vi.as_declaration()
                    ));
                }
                let dims = d
                    .dims
                    .iter()
                    .enumerate()
                    .map(|(axis, x)| match x {
                        DeclDim::Fixed(n) => usize::try_from(*n)
                            .map(Extent::Fixed)
                            .map_err(|_| format!("input '{}': dimension {n} too large", d.name)),
                        DeclDim::Symbol(s) => Ok(Extent::Symbol(s.clone())),
                        DeclDim::Any => Ok(Extent::Symbol(fresh_symbol(&d.name, axis))),
                    })
                    .collect::<Result<_, _>>()?;
                return Ok(InputFact {
                    name: d.name.clone(),
                    dtype: d.dtype,
                    dims,
                });
            }
            let dtype = file_dtype.ok_or_else(|| {
                format!(
                    "input '{}' has no declared type: declare it with --input {}=DTYPE[DIMS]",
                    vi.name, vi.name
                )
            })??;
            let dims = vi.dims.as_ref().ok_or_else(|| {
                format!(
                    "input '{}' has no declared shape: declare it with --input {}={}[DIMS]",
                    vi.name,
                    vi.name,
                    dtype.short_name()
                )
            })?;
            let dims = dims
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    OnnxDim::Value(v) if *v >= 0 => Extent::Fixed(*v as usize),
                    OnnxDim::Param(p) if is_tract_symbol(p) => Extent::Symbol(p.clone()),
                    _ => Extent::Symbol(fresh_symbol(&vi.name, axis)),
                })
                .collect();
            Ok(InputFact {
                name: vi.name.clone(),
                dtype,
                dims,
            })
        })
        .collect()
}

/// A tract model of `bytes` with every input's fact set: symbolic, or at `shapes`.
fn typed_model(
    bytes: &[u8],
    facts: &[InputFact],
    shapes: Option<&[Vec<usize>]>,
    ignore_value_info: bool,
) -> anyhow::Result<Model> {
    let options = OnnxOptions::new().ignore_value_info(ignore_value_info);
    let mut m = onnx()?.load_buffer_with_options(bytes, options)?;
    for ix in 0..m.input_count()? {
        let name = m.input_name(ix)?;
        let k = facts.iter().position(|f| f.name == name).ok_or_else(|| {
            anyhow::anyhow!("tract sees an input '{name}' the file does not list")
        })?;
        let spec = facts[k].spec(shapes.map(|s| s[k].as_slice()));
        m.set_input_fact(ix, spec.as_str())?;
    }
    m.into_model()
}

/// The outputs of a typed model, named as the graph names them.
fn outputs_of(model: &Model, graph: &Graph) -> Result<Vec<IoSpec>, (ErrorClass, String)> {
    let load = |e: anyhow::Error| (ErrorClass::LoadError, format!("{e:#}"));
    let mut outputs = Vec::new();
    for i in 0..model.output_count().map_err(load)? {
        let name = model.output_name(i).map_err(load)?;
        let fact = model.output_fact(i).map_err(load)?;
        outputs.push(io_spec(name, &fact).map_err(|e| (ErrorClass::UnsupportedOp, e))?);
    }
    // tract names outputs by their node; clients use the graph's output names.
    if graph.outputs.len() == outputs.len() {
        for (o, g) in outputs.iter_mut().zip(&graph.outputs) {
            o.name = g.name.clone();
        }
    }
    Ok(outputs)
}

/// Why tract refused a model, as a refusal a publisher can act on: the class, and a
/// message naming the node, the operator and what would make it work.
///
/// * An operator tract lacks (`Unimplemented(Op)`, wherever tract meets it) is
///   [`ErrorClass::UnsupportedOp`], named with its node and domain.
/// * So is an `If` tract cannot type: tract 0.23 needs both branches to give outputs of
///   one type and shape, even when the condition is known.
/// * Anything else is [`ErrorClass::LoadError`], with the node tract names and, where they
///   apply, the `--input` and `--const` declarations that would help.
fn refusal(
    e: &anyhow::Error,
    graph: &Graph,
    facts: &[InputFact],
    spec: &ServingSpec,
) -> (ErrorClass, String) {
    let msg = format!("{e:#}");
    if let Some(op) = unimplemented_op(&msg) {
        let what = graph.find_op(op).map_or_else(
            || format!("operator {op}"),
            |n| format!("node '{}' ({})", n.display_name(), n.qualified_op()),
        );
        return (
            ErrorClass::UnsupportedOp,
            format!(
                "{what}: tract {TRACT} does not implement this operator; {}",
                op_hint(graph, op)
            ),
        );
    }
    let consts: Vec<String> = graph
        .if_condition_inputs()
        .into_iter()
        .filter(|i| i.is_scalar() && !spec.consts.iter().any(|c| c.name == i.name))
        .map(|i| format!("--const {}=VALUE", i.name))
        .collect();
    let node = tract_node(&msg);
    if let Some((name, "If")) = node {
        let fix = if consts.is_empty() {
            "use an export of the model without this If (silero-vad ships an \"op18-ifless\" \
             one), or fold it at fixed input shapes (e.g. onnxsim --overwrite-input-shape)"
                .to_string()
        } else {
            format!(
                "the If branches on {}: fix it for the deployment with {}",
                if consts.len() == 1 {
                    "an input"
                } else {
                    "inputs"
                },
                consts.join(" ")
            )
        };
        return (
            ErrorClass::UnsupportedOp,
            format!(
                "node '{name}' (If): tract {TRACT} cannot type this If, whose branches give \
                 outputs of different shapes or types; to make it work: {fix} ({msg})"
            ),
        );
    }
    let mut hints = Vec::new();
    let open: Vec<&InputFact> = facts.iter().filter(|f| !f.is_fixed()).collect();
    if !open.is_empty() {
        hints.push(format!(
            "declare the input shapes at publish time, with numbers for the sizes you serve \
             (e.g. {})",
            open.iter()
                .map(|f| format!("--input {}", f.declaration()))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    if !consts.is_empty() {
        hints.push(format!(
            "fix the inputs an If branches on with {}",
            consts.join(" ")
        ));
    }
    let hint = if hints.is_empty() {
        String::new()
    } else {
        format!(" (to make it work: {})", hints.join("; "))
    };
    let at = node.map_or_else(String::new, |(n, op)| format!("node '{n}' ({op}): "));
    (ErrorClass::LoadError, format!("{at}{msg}{hint}"))
}

/// The operator of an `Unimplemented(Op)` in a tract error.
fn unimplemented_op(msg: &str) -> Option<&str> {
    let start = msg.find("Unimplemented(")? + "Unimplemented(".len();
    let len = msg[start..].find(')')?;
    Some(&msg[start..start + len])
}

/// The first node a tract error names (`... node #12 "name" Op ...`): its name and
/// operator.
fn tract_node(msg: &str) -> Option<(&str, &str)> {
    let at = msg.find("node #")? + "node #".len();
    let rest = msg[at..].trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix(" \"")?;
    let end = rest.find("\" ")?;
    let name = &rest[..end];
    let op = rest[end + 2..]
        .split([' ', ':'])
        .next()
        .filter(|op| !op.is_empty())?;
    Some((name, op))
}

/// How much faster plans prepared per shape must run than the symbolic plan for a model to
/// use them (each shape's preparation costs CPU and a copy of the model).
const SHAPED_GAIN: f64 = 1.5;

/// The tract version Pollen is built with, for messages.
const TRACT: &str = "0.23";

/// What would make a model with operator `op` work.
fn op_hint(graph: &Graph, op: &str) -> String {
    let ml = graph.find_op(op).is_some_and(|n| n.domain == "ai.onnx.ml");
    match op {
        "ZipMap" => "a ZipMap is served only at a graph output (as the tensor it wraps); export \
                     without it (skl2onnx: options={id(model): {'zipmap': False}})"
            .into(),
        _ if ml => format!(
            "of the ai.onnx.ml operators tract runs only LinearClassifier, LinearRegressor, \
             Normalizer, TreeEnsembleClassifier and CategoryMapper, and Pollen writes Scaler \
             and TreeEnsembleRegressor (SUM or AVERAGE, no post-transform) with those; \
             convert the model to standard ONNX operators (e.g. hummingbird for tree \
             ensembles), or leave {op} out of the exported graph"
        ),
        _ => format!("export the model with operators tract implements, without {op}"),
    }
}

impl LoadedModel {
    /// Load, optimise and warm an ONNX model (see the module documentation), prepared as
    /// the manifest's serving `spec` says. `golden` are the checks the caller runs next
    /// ([`LoadedModel::check_golden`]): a model prepared per shape is warmed with the first
    /// one's shapes. Blocking and CPU-bound: call it on a blocking thread. A panic inside
    /// tract is caught and reported as [`ErrorClass::Panic`]; an operator tract lacks is
    /// [`ErrorClass::UnsupportedOp`] at whichever step finds it ([`super::classify`]).
    ///
    /// Sizes are checked before anything is allocated: a file larger than the budget, or
    /// fixed input and output shapes whose tensors would take more than the budget
    /// together (or overflow), are a [`ErrorClass::LoadError`] naming the culprit. The
    /// budget does not bound what tract allocates while it optimises; the trial run in a
    /// child process ([`super::trial`]) does.
    pub fn load(
        path: &Path,
        channel: &str,
        version: u64,
        manifest: ManifestId,
        spec: &ServingSpec,
        golden: &GoldenSet,
        limits: &ServingLimits,
    ) -> Result<Self, (ErrorClass, String)> {
        let budget = limits.budget;
        let size = std::fs::metadata(path)
            .map_err(|e| (ErrorClass::Unavailable, format!("{}: {e}", path.display())))?
            .len();
        if size > budget {
            return Err((
                ErrorClass::LoadError,
                format!(
                    "the model file has {size} bytes, over the model memory budget of {budget} bytes"
                ),
            ));
        }
        // Every artifact a node fetches is tried as a model: one that is not an ONNX model
        // is known from its first fields (the walk seeks past large ones), before reading
        // the file whole (a 1 GiB data file cost 400 MiB of memory here).
        pollen_keys::onnx_pb::graph_io(path).map_err(|e| {
            let why = format!("the file is not an ONNX model: {}", e.root_cause());
            (ErrorClass::LoadError, why)
        })?;
        let bytes = std::fs::read(path)
            .map_err(|e| (ErrorClass::Unavailable, format!("{}: {e}", path.display())))?;
        let prepared =
            onnx::prepare(bytes, &spec.consts).map_err(|e| (ErrorClass::LoadError, e))?;
        let dequantized = prepared.dequantized > 0;
        for r in &prepared.rewritten {
            tracing::info!("{channel} version {version}: {r}");
        }
        let graph = prepared.graph;
        let facts = input_facts(&graph, spec).map_err(|e| (ErrorClass::LoadError, e))?;
        let bytes = Arc::new(prepared.bytes);
        let unsupported = Arc::new(Mutex::new(None));
        // Prepared copies held at once: a few, and no more than the budget holds copies of
        // the model.
        let capacity = limits
            .specialisations
            .min(usize::try_from(budget / size.max(1)).unwrap_or(usize::MAX))
            .max(1);
        let attempt = {
            let (bytes, facts, graph) = (bytes.clone(), facts.clone(), graph.clone());
            let (spec, unsupported) = (spec.clone(), unsupported.clone());
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                build_engine(
                    &bytes,
                    &facts,
                    &graph,
                    &spec,
                    budget,
                    capacity,
                    unsupported,
                    dequantized,
                )
            }))
        };
        let Built {
            engine,
            outputs,
            probe_failure,
            half,
        } = match attempt {
            Ok(r) => r?,
            Err(_) => {
                return Err((
                    ErrorClass::Panic,
                    "tract panicked while loading the model".into(),
                ));
            }
        };
        if let Some((class, msg)) = probe_failure
            && golden.checks.is_empty()
        {
            // Nothing shows that any shape works: refuse rather than fail every request.
            return Err(match class {
                ErrorClass::UnsupportedOp => (class, msg),
                _ => (
                    class,
                    format!(
                        "tract cannot prepare the model with symbolic dimensions, nor with \
                         every one at 1 or 64: {msg}; declare the input shapes you serve \
                         (--input) or publish golden checks of a real input"
                    ),
                ),
            });
        }
        if let Some(h) = half
            && prepared.dequantized == 0
        {
            tracing::info!(
                "{channel} version {version}: {} float32 weight matrices ({:.1} MB) served by \
                 the node's own product",
                h.float.0,
                h.float.1 as f64 / 1e6
            );
        }
        if prepared.dequantized > 0 {
            let held = match half {
                Some(h) => format!(
                    "; {} weight matrices held as int8 ({:.1} MB), {} as float16 ({:.1} MB)",
                    h.int8.0,
                    h.int8.1 as f64 / 1e6,
                    h.half.0,
                    h.half.1 as f64 / 1e6
                ),
                None => "; weights held as float32".into(),
            };
            tracing::info!(
                "{channel} version {version}: {} dequantised weights made float at load{held}",
                prepared.dequantized
            );
        }
        let inputs: Vec<IoSpec> = facts.iter().map(InputFact::io_spec).collect();
        if matches!(engine, Engine::Symbolic { .. }) {
            check_budget(&inputs, &outputs, budget).map_err(|e| (ErrorClass::LoadError, e))?;
        }
        let mut notes = BTreeMap::new();
        for z in &prepared.zipmaps {
            let classes = if z.labels.is_empty() {
                String::new()
            } else {
                format!("; classes along the last axis: {}", z.labels.join(", "))
            };
            notes.insert(
                z.output.clone(),
                format!(
                    "the ZipMap that produced this output is taken out: it is the probability \
                     tensor the ZipMap wrapped, one row per input row{classes}"
                ),
            );
        }
        let mut m = LoadedModel {
            channel: channel.to_string(),
            version,
            manifest,
            inputs,
            outputs,
            constants: spec.consts.clone(),
            notes,
            health: HealthWindow::default(),
            facts,
            engine,
            limits: limits.clone(),
            unsupported,
            golden: GoldenSet::default(),
            recheck: Mutex::new(None),
            lm: None,
        };
        m.warm(golden.checks.first())?;
        if let Some(check) = golden.checks.first()
            && matches!(m.engine, Engine::Symbolic { .. })
            && !m.facts.iter().all(InputFact::is_fixed)
        {
            let unsupported = m.unsupported.clone();
            let cache = shape_cache(
                &bytes,
                &m.facts,
                &graph,
                spec,
                budget,
                capacity,
                unsupported,
            );
            m.prefer_shaped(cache, check);
        }
        Ok(m)
    }

    /// A model tract optimises with symbolic dimensions may still run faster from a plan
    /// prepared for concrete shapes (tract folds more: PP-OCRv6's recogniser 2.2x). Time
    /// both on the golden check's inputs (the best of four runs each, the first warming);
    /// where the shaped plan is at least [`SHAPED_GAIN`] times faster, keep `cache`:
    /// requests then run their shape's plan once it is prepared (in the background, from
    /// the shape's second request; never waited for). A model without golden checks keeps
    /// the symbolic plan alone.
    fn prefer_shaped(&mut self, cache: ShapeCache<Shaped>, check: &GoldenCheck) {
        let inputs: Vec<Tensor> = check.inputs.iter().map(tensor_of).collect();
        let best = |m: &Self| {
            let mut best = Duration::MAX;
            for _ in 0..4 {
                let t = Instant::now();
                m.run(&inputs).ok()?;
                best = best.min(t.elapsed());
            }
            Some(best)
        };
        let Some(symbolic) = best(self) else { return };
        let shapes: Vec<Vec<usize>> = self
            .facts
            .iter()
            .filter_map(|f| inputs.iter().find(|t| t.name == f.name))
            .map(|t| t.shape.clone())
            .collect();
        if cache.get(&shapes, None).is_err() {
            return;
        }
        if let Engine::Symbolic { faster, .. } = &mut self.engine {
            *faster = Some(Faster::new(cache));
        }
        let shaped = best(self);
        let gain = shaped.map_or(0.0, |s| symbolic.as_secs_f64() / s.as_secs_f64().max(1e-9));
        if gain >= SHAPED_GAIN {
            tracing::info!(
                "{} version {}: plans prepared per input shape run {gain:.1}x faster than \
                 the symbolic one ({symbolic:?} against {shaped:?} on the golden inputs); \
                 each shape requested twice gets one, prepared in the background",
                self.channel,
                self.version
            );
        } else if let Engine::Symbolic { faster, .. } = &mut self.engine {
            *faster = None;
        }
    }

    /// The one runnable of a model tract prepared with symbolic dimensions (`None` for
    /// one prepared per shape).
    pub fn symbolic_runnable(&self) -> Option<&Runnable> {
        match &self.engine {
            Engine::Symbolic { runnable, .. } => Some(runnable),
            Engine::PerShape(_) => None,
        }
    }

    /// Serve this graph as the language model `lm` (made from it) as well.
    pub fn attach_lm(&mut self, lm: super::lm::LmModel) {
        self.lm = Some(lm);
    }

    /// The language model, for a release that is one.
    pub fn lm(&self) -> Option<&super::lm::LmModel> {
        self.lm.as_ref()
    }

    /// Keep the golden checks the model just passed, for [`LoadedModel::at_fault`].
    pub fn keep_golden(&mut self, checks: GoldenSet) {
        self.golden = checks;
    }

    /// Run the golden checks at activation: a failure is [`ErrorClass::GoldenMismatch`],
    /// or [`ErrorClass::UnsupportedOp`] when preparing the model for the checks' shapes
    /// met an operator tract lacks.
    pub fn check_golden(&self, checks: &GoldenSet) -> Result<(), (ErrorClass, String)> {
        self.golden(checks).map_err(|e| {
            match self
                .unsupported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
            {
                Some(u) => (ErrorClass::UnsupportedOp, u),
                None => (ErrorClass::GoldenMismatch, e),
            }
        })
    }

    /// A request made the model fail (an error or a caught panic): is the model at fault,
    /// rather than the request's input? Only when the model now fails its own golden
    /// checks, re-run here (at most once per [`RECHECK_INTERVAL`]; the verdict holds in
    /// between). A model without golden checks passed its warm-up run at activation, so
    /// a failure is the input's. This is what keeps one client from failing a rollout:
    /// its requests are answered 400 and count as bad input, not as model errors.
    pub fn at_fault(&self) -> bool {
        if self.golden.checks.is_empty() {
            return false;
        }
        let mut last = self.recheck.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, broken)) = *last
            && at.elapsed() < RECHECK_INTERVAL
        {
            return broken;
        }
        let broken = self.golden(&self.golden).is_err();
        *last = Some((Instant::now(), broken));
        broken
    }

    /// Input shapes this model was prepared for, and prepared copies held now: `None` for
    /// a model that serves every shape with one runnable.
    pub fn specialisations(&self) -> Option<(u64, usize)> {
        match &self.engine {
            Engine::Symbolic { faster: None, .. } => None,
            Engine::Symbolic {
                faster: Some(Faster { cache: c, .. }),
                ..
            }
            | Engine::PerShape(c) => Some((c.specialisations(), c.cached())),
        }
    }

    /// Warm the model so that the first request does not pay for lazy initialisation: one
    /// run on zeros with every symbolic dimension at 1. A model with fixed shapes must pass
    /// it; for one with symbolic dimensions 1 may be outside what it takes (a detector
    /// that halves its input five times), so a failure only defers the warm-up to the
    /// golden checks or the first request. A model prepared per shape is prepared for the
    /// first golden check's inputs instead (its probe showed the model analyses).
    fn warm(&self, golden: Option<&GoldenCheck>) -> Result<(), (ErrorClass, String)> {
        let unsupported = || {
            self.unsupported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .map(|u| (ErrorClass::UnsupportedOp, u))
        };
        if let Engine::PerShape(_) = self.engine {
            let Some(check) = golden else { return Ok(()) };
            let inputs: Vec<Tensor> = check.inputs.iter().map(tensor_of).collect();
            return match self.run(&inputs) {
                Ok(_) => Ok(()),
                Err(e) => Err(unsupported().unwrap_or((
                    ErrorClass::LoadError,
                    format!("the model cannot be prepared for the golden check's inputs: {e}"),
                ))),
            };
        }
        let fixed = self.facts.iter().all(InputFact::is_fixed);
        let inputs: Vec<Tensor> = self
            .inputs
            .iter()
            .map(|s| {
                // Sizes were checked against the budget at load (check_budget).
                let shape: Vec<usize> = warm_shape(&s.shape).collect();
                let bytes = tensor_bytes(s).unwrap_or(0) as usize;
                Tensor {
                    name: s.name.clone(),
                    datatype: s.datatype,
                    shape,
                    data: vec![0u8; bytes],
                }
            })
            .collect();
        match self.run(&inputs) {
            Ok(_) => Ok(()),
            Err(e) if fixed => Err((ErrorClass::LoadError, format!("warm-up run failed: {e}"))),
            Err(e) => {
                tracing::info!(
                    "{} version {}: no warm-up with symbolic dimensions at 1 ({e}); the golden \
                     checks or the first request warm it",
                    self.channel,
                    self.version
                );
                Ok(())
            }
        }
    }

    /// Serve a request: [`LoadedModel::run`], except that a request whose input shapes
    /// are still being prepared waits at most [`ServingLimits::prepare_wait`] and is then
    /// answered [`ServeError::Preparing`].
    pub fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ServeError> {
        self.run_within(inputs, Some(self.limits.prepare_wait))
    }

    /// Check `inputs` against the model (names, types, shapes; constant inputs may be
    /// given only with their value) and run it, preparing the model for their shapes
    /// first if it is prepared per shape (waiting as long as that takes). Outputs are in
    /// graph order. A panic inside tract is caught and returned as a runtime error.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ServeError> {
        self.run_within(inputs, None)
    }

    fn run_within(
        &self,
        inputs: &[Tensor],
        wait: Option<Duration>,
    ) -> Result<Vec<Tensor>, ServeError> {
        for t in inputs {
            if self.inputs.iter().any(|s| s.name == t.name) {
                continue;
            }
            if let Some(c) = self.constants.iter().find(|c| c.name == t.name) {
                check_constant(c, t)?;
                continue;
            }
            return Err(ServeError::BadInput(format!(
                "unknown input '{}': the model takes {}",
                t.name,
                self.inputs
                    .iter()
                    .map(|s| format!("'{}'", s.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        let mut shapes = Vec::with_capacity(self.inputs.len());
        let mut symbols: Vec<(String, i64, String)> = Vec::new();
        let mut sizes = Vec::new();
        for (spec, fact) in self.inputs.iter().zip(&self.facts) {
            let t = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| ServeError::BadInput(format!("missing input '{}'", spec.name)))?;
            if t.datatype != spec.datatype {
                return Err(ServeError::BadInput(format!(
                    "input '{}' has datatype {}, the model takes {}",
                    t.name,
                    t.datatype.kserve_name(),
                    spec.datatype.kserve_name()
                )));
            }
            let fits = t.shape.len() == spec.shape.len()
                && t.shape
                    .iter()
                    .zip(&spec.shape)
                    .all(|(got, want)| *want < 0 || *got as i64 == *want);
            if !fits {
                return Err(ServeError::BadInput(format!(
                    "input '{}' has shape {:?}, the model takes {:?} (-1: any)",
                    t.name, t.shape, spec.shape
                )));
            }
            for (got, d) in t.shape.iter().zip(&fact.dims) {
                let Extent::Symbol(s) = d else { continue };
                let got = *got as i64;
                match symbols.iter().find(|(name, _, _)| name == s) {
                    Some((_, v, other)) if *v != got => {
                        return Err(ServeError::BadInput(format!(
                            "dimension {s} is {v} in input '{other}' but {got} in input '{}'",
                            t.name
                        )));
                    }
                    Some(_) => {}
                    None => symbols.push((s.clone(), got, t.name.clone())),
                }
            }
            let dt = to_tract(t.datatype).ok_or_else(|| {
                ServeError::BadInput(format!("input '{}': BYTES is not supported", t.name))
            })?;
            let tensor = tract::prelude::Tensor::from_bytes(dt, &t.shape, &t.data)
                .map_err(|e| ServeError::BadInput(format!("input '{}': {e}", t.name)))?;
            sizes.push((
                "input",
                t.name.clone(),
                t.shape.iter().map(|d| *d as i64).collect::<Vec<_>>(),
                Some(t.data.len() as u64),
            ));
            shapes.push(t.shape.clone());
            ordered.push(tensor);
        }
        match &self.engine {
            Engine::Symbolic {
                runnable,
                output_facts,
                faster,
            } => {
                let values: Vec<(&str, i64)> =
                    symbols.iter().map(|(s, v, _)| (s.as_str(), *v)).collect();
                for (spec, fact) in self.outputs.iter().zip(output_facts) {
                    // Outputs whose size the inputs do not settle are not checked here.
                    let dims: Option<Vec<usize>> = fact.dims().ok().and_then(|ds| {
                        ds.map(|d| d.eval(values.iter().copied()).ok()?.to_int64().ok())
                            .map(|d| d.and_then(|d| usize::try_from(d).ok()))
                            .collect()
                    });
                    if let Some(dims) = dims {
                        sizes.push((
                            "output",
                            spec.name.clone(),
                            dims.iter().map(|d| *d as i64).collect(),
                            shape_bytes(&dims, spec.datatype),
                        ));
                    }
                }
                check_sizes(&sizes, self.limits.budget).map_err(ServeError::BadInput)?;
                // A shape's own plan if it is ready; else this request runs the symbolic
                // one (and a shape seen before starts its preparation in the background).
                if let Some(f) = faster
                    && let Some(shaped) = f.plan(&shapes)
                {
                    return run_tract(&shaped.runnable, ordered, &shaped.outputs);
                }
                run_tract(runnable, ordered, &self.outputs)
            }
            Engine::PerShape(cache) => {
                check_sizes(&sizes, self.limits.budget).map_err(ServeError::BadInput)?;
                let shaped = cache.get(&shapes, wait).map_err(|e| match e {
                    CacheError::Failed(m) => ServeError::BadInput(format!(
                        "the model cannot be prepared for input shapes {shapes:?}: {m}"
                    )),
                    CacheError::Preparing(m) => ServeError::Preparing(m),
                })?;
                run_tract(&shaped.runnable, ordered, &shaped.outputs)
            }
        }
    }
}

/// A request may repeat a constant input only with its value (as a scalar or a tensor of
/// one element).
fn check_constant(c: &TensorData, t: &Tensor) -> Result<(), ServeError> {
    let elements = |s: &[usize]| s.iter().product::<usize>();
    let same = t.datatype == c.dtype
        && elements(&t.shape) as u64 == c.shape.iter().product::<u64>()
        && t.data == c.data;
    if same {
        return Ok(());
    }
    let shown = super::kserve::tensor_to_json_data(&tensor_of(c));
    Err(ServeError::BadInput(format!(
        "input '{}' is fixed at {shown} ({}) for this deployment (published with --const); \
         leave it out of the request, or give that value",
        c.name,
        c.dtype.kserve_name()
    )))
}

/// A manifest tensor as a request tensor.
fn tensor_of(t: &TensorData) -> Tensor {
    Tensor {
        name: t.name.clone(),
        datatype: t.dtype,
        shape: t.shape.iter().map(|d| *d as usize).collect(),
        data: t.data.clone(),
    }
}

/// Run a runnable, catching panics, and name its outputs.
fn run_tract(
    runnable: &Runnable,
    ordered: Vec<tract::prelude::Tensor>,
    outputs: &[IoSpec],
) -> Result<Vec<Tensor>, ServeError> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runnable.run(ordered)));
    let outs = match result {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(ServeError::Runtime(format!("{e:#}"))),
        Err(_) => return Err(ServeError::Panicked),
    };
    outs.into_iter()
        .zip(outputs)
        .map(|(o, spec)| {
            let (dt, shape, bytes) = o
                .as_bytes()
                .map_err(|e| ServeError::Runtime(e.to_string()))?;
            let datatype = from_tract(dt).ok_or_else(|| {
                ServeError::Runtime(format!("output '{}' has an unsupported type", spec.name))
            })?;
            Ok(Tensor {
                name: spec.name.clone(),
                datatype,
                shape: shape.to_vec(),
                data: bytes.to_vec(),
            })
        })
        .collect()
}

/// How a model runs, as [`build_engine`] found.
struct Built {
    engine: Engine,
    outputs: Vec<IoSpec>,
    /// For a model prepared per shape whose probes all failed: why.
    probe_failure: Option<(ErrorClass, String)>,
    /// Weight matrices held narrower than float32 ([`super::half`]).
    half: Option<Narrowed>,
}

/// A model prepared with symbolic dimensions.
struct Symbolic {
    runnable: Runnable,
    output_facts: Vec<Fact>,
    outputs: Vec<IoSpec>,
    half: Option<Narrowed>,
}

/// Weight matrices held as int8 ([`super::int8`]) and as float16 ([`super::half`]): how
/// many of each, and their bytes.
#[derive(Debug, Clone, Copy)]
struct Narrowed {
    int8: (u64, u64),
    half: (u64, u64),
    /// Float32 matrices of a language model packed for the node's product.
    float: (u64, u64),
}

/// Build how the model runs: symbolic if tract can, else per shape. When the file
/// `dequantized` weights, weight matrices of a symbolic model are held as int8 or float16
/// ([`super::half::HalfWeights`]); a float32 language model's go to the node's product
/// ([`super::half::FloatWeights`]); either falls back to tract's float32 when tract
/// cannot prepare the model so.
#[allow(clippy::too_many_arguments)]
fn build_engine(
    bytes: &Arc<Vec<u8>>,
    facts: &[InputFact],
    graph: &Graph,
    spec: &ServingSpec,
    budget: u64,
    capacity: usize,
    unsupported: Arc<Mutex<Option<String>>>,
    dequantized: bool,
) -> Result<Built, (ErrorClass, String)> {
    // The outputs' facts and names are read before the model is consumed by optimising.
    let symbolic = |ignore_value_info, narrow: bool| -> anyhow::Result<Symbolic> {
        let mut model = typed_model(bytes, facts, None, ignore_value_info)?;
        let output_facts = (0..model.output_count()?)
            .map(|i| model.output_fact(i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let outputs = outputs_of(&model, graph).map_err(|(_, e)| anyhow::anyhow!(e))?;
        let half = if narrow {
            model.transform(if dequantized {
                super::half::HALF_WEIGHTS
            } else {
                super::half::FLOAT_WEIGHTS
            })?;
            let count = |p: &str| {
                model
                    .property(p)
                    .ok()
                    .and_then(|t| t.as_slice::<i64>().ok()?.first().copied())
                    .map_or(0, |n| n as u64)
            };
            Some(Narrowed {
                int8: (count(super::half::INT8), count(super::half::INT8_BYTES)),
                half: (
                    count(super::half::CONVERTED),
                    count(super::half::CONVERTED_BYTES),
                ),
                float: (count(super::half::FLOAT), count(super::half::FLOAT_BYTES)),
            })
        } else {
            None
        };
        let runnable = model.into_runnable()?;
        Ok(Symbolic {
            runnable,
            output_facts,
            outputs,
            half,
        })
    };
    let narrow = dequantized || spec.lm.is_some();
    let attempt = |ignore_value_info| {
        if !narrow {
            return symbolic(ignore_value_info, false);
        }
        symbolic(ignore_value_info, true).or_else(|e| {
            tracing::info!(
                "weights kept as float32: tract could not prepare the model with int8 or float16 \
                 ones ({e:#})"
            );
            symbolic(ignore_value_info, false)
        })
    };
    let first = match attempt(false) {
        Ok(r) => Ok(r),
        // The file's intermediate shapes may contradict what tract infers.
        Err(e) => attempt(true).map_err(|_| e),
    };
    match first {
        Ok(s) => Ok(Built {
            engine: Engine::Symbolic {
                runnable: s.runnable,
                output_facts: s.output_facts,
                faster: None,
            },
            outputs: s.outputs,
            probe_failure: None,
            half: s.half,
        }),
        Err(e) => {
            let (class, msg) = refusal(&e, graph, facts, spec);
            let unimplemented = unimplemented_op(&format!("{e:#}")).is_some();
            if unimplemented || facts.iter().all(InputFact::is_fixed) {
                return Err((class, msg));
            }
            tracing::info!(
                "the model is prepared per input shape: tract cannot optimise it with symbolic \
                 dimensions ({msg})"
            );
            // Probes with every symbol at 1, then at 64 (a detector that halves its input
            // five times needs a multiple of 32), analysis only (nothing optimised or
            // cached): they find operators tract lacks, and the outputs' types.
            let mut probe_failure = None;
            let mut outputs = None;
            for size in [1, 64] {
                let at: Vec<Vec<usize>> = facts
                    .iter()
                    .map(|f| {
                        f.dims
                            .iter()
                            .map(|d| match d {
                                Extent::Fixed(n) => *n,
                                Extent::Symbol(_) => size,
                            })
                            .collect()
                    })
                    .collect();
                match typed_model(bytes, facts, Some(&at), true) {
                    Ok(m) => {
                        outputs = Some(with_declared_dims(outputs_of(&m, graph)?, graph));
                        break;
                    }
                    Err(e) if unimplemented_op(&format!("{e:#}")).is_some() => {
                        return Err(refusal(&e, graph, facts, spec));
                    }
                    Err(e) => {
                        probe_failure.get_or_insert_with(|| refusal(&e, graph, facts, spec));
                    }
                }
            }
            if outputs.is_some() {
                probe_failure = None;
            }
            let outputs = outputs.unwrap_or_else(|| declared_outputs(graph));
            let cache = shape_cache(bytes, facts, graph, spec, budget, capacity, unsupported);
            Ok(Built {
                engine: Engine::PerShape(cache),
                outputs,
                probe_failure,
                half: None,
            })
        }
    }
}

/// A cache of plans prepared per input shape (an operator tract lacks, met while
/// preparing, is kept in `unsupported` for the refusal's class).
fn shape_cache(
    bytes: &Arc<Vec<u8>>,
    facts: &[InputFact],
    graph: &Graph,
    spec: &ServingSpec,
    budget: u64,
    capacity: usize,
    unsupported: Arc<Mutex<Option<String>>>,
) -> ShapeCache<Shaped> {
    let (bytes, facts, graph, spec) = (bytes.clone(), facts.to_vec(), graph.clone(), spec.clone());
    ShapeCache::new(
        capacity,
        Box::new(move |shapes: &[Vec<usize>]| {
            prepare_shape(&bytes, &facts, &graph, &spec, shapes, budget).map_err(|(class, msg)| {
                if class == ErrorClass::UnsupportedOp {
                    unsupported
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert_with(|| msg.clone());
                }
                msg
            })
        }),
    )
}

/// Outputs of a probe (types, concrete shapes) with the dimensions the file leaves open
/// shown as -1.
fn with_declared_dims(mut probed: Vec<IoSpec>, graph: &Graph) -> Vec<IoSpec> {
    let declared = declared_outputs(graph);
    for (o, d) in probed.iter_mut().zip(&declared) {
        o.shape = if d.shape.len() == o.shape.len() {
            d.shape.clone()
        } else {
            vec![-1; o.shape.len()]
        };
    }
    probed
}

/// Outputs as the file declares them (per-shape models have no general facts).
fn declared_outputs(graph: &Graph) -> Vec<IoSpec> {
    graph
        .outputs
        .iter()
        .map(|o| IoSpec {
            name: o.name.clone(),
            // A ZipMap's output (no tensor type) is the float tensor it wrapped.
            datatype: o.elem.and_then(onnx::dtype_of_elem).unwrap_or(DType::F32),
            shape: o.dims.as_ref().map_or_else(
                || vec![-1, -1],
                |d| {
                    d.iter()
                        .map(|d| match d {
                            OnnxDim::Value(v) if *v >= 0 => *v,
                            _ => -1,
                        })
                        .collect()
                },
            ),
        })
        .collect()
}

/// Prepare the model for concrete `shapes`: analyse, check the run's tensors against the
/// budget, optimise.
fn prepare_shape(
    bytes: &[u8],
    facts: &[InputFact],
    graph: &Graph,
    spec: &ServingSpec,
    shapes: &[Vec<usize>],
    budget: u64,
) -> Result<Shaped, (ErrorClass, String)> {
    let model = typed_model(bytes, facts, Some(shapes), true)
        .or_else(|e| typed_model(bytes, facts, Some(shapes), false).map_err(|_| e))
        .map_err(|e| refusal(&e, graph, facts, spec))?;
    let outputs = outputs_of(&model, graph)?;
    let mut sizes = Vec::new();
    for (f, s) in facts.iter().zip(shapes) {
        sizes.push((
            "input",
            f.name.clone(),
            s.iter().map(|d| *d as i64).collect(),
            shape_bytes(s, f.dtype),
        ));
    }
    for o in &outputs {
        let dims: Option<Vec<usize>> = o.shape.iter().map(|d| usize::try_from(*d).ok()).collect();
        let bytes = dims.as_deref().and_then(|d| shape_bytes(d, o.datatype));
        sizes.push(("output", o.name.clone(), o.shape.clone(), bytes));
    }
    check_sizes(&sizes, budget).map_err(|e| (ErrorClass::LoadError, e))?;
    let runnable = model
        .into_runnable()
        .map_err(|e| refusal(&e, graph, facts, spec))?;
    Ok(Shaped { runnable, outputs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServingLimits {
        ServingLimits::new(1 << 30)
    }

    fn digits() -> LoadedModel {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-v1.onnx");
        LoadedModel::load(
            &path,
            "digits",
            1,
            ManifestId([0; 32]),
            &ServingSpec::default(),
            &GoldenSet::default(),
            &limits(),
        )
        .expect("load")
    }

    fn check(model: &LoadedModel, shift: f32) -> GoldenCheck {
        let input = Tensor {
            name: "input".into(),
            datatype: DType::F32,
            shape: vec![1, 64],
            data: vec![0; 256],
        };
        let out = model.run(std::slice::from_ref(&input)).expect("run");
        let data: Vec<u8> = out[0]
            .data
            .chunks(4)
            .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + shift).to_le_bytes())
            .collect();
        let t = |t: &Tensor, data: Vec<u8>| TensorData {
            name: t.name.clone(),
            dtype: t.datatype,
            shape: t.shape.iter().map(|d| *d as u64).collect(),
            data,
        };
        GoldenCheck {
            inputs: vec![t(&input, input.data.clone())],
            expected: vec![t(&out[0], data)],
            tolerance: 1e-4,
        }
    }

    #[test]
    fn a_failure_is_the_model_fault_only_if_its_golden_checks_fail_again() {
        let mut m = digits();
        assert!(!m.at_fault(), "no golden checks: the input is at fault");
        let good = check(&m, 0.0);
        m.keep_golden(GoldenSet {
            checks: vec![good],
            rtol: vec![],
        });
        assert!(!m.at_fault(), "still passes its checks");
        let mut broken = digits();
        let bad = check(&broken, 1.0);
        broken.keep_golden(GoldenSet {
            checks: vec![bad],
            rtol: vec![],
        });
        assert!(broken.at_fault(), "fails its own checks now");
        assert!(broken.at_fault(), "the verdict holds between re-runs");
    }

    #[test]
    fn sizes_over_the_budget_or_past_u64_are_refused_before_allocating() {
        let spec = |shape: Vec<i64>| IoSpec {
            name: "x".into(),
            datatype: DType::F32,
            shape,
        };
        assert!(check_budget(&[spec(vec![1, 64])], &[], 256).is_ok());
        let e = check_budget(&[spec(vec![1, 65])], &[], 256).unwrap_err();
        assert!(e.contains("input 'x'") && e.contains("260 bytes"), "{e}");
        let e = check_budget(&[spec(vec![1 << 32, 1 << 32, 1 << 32])], &[], u64::MAX).unwrap_err();
        assert!(e.contains("more than 2^64"), "{e}");
        // Symbolic dimensions count as 1 for the warm-up run.
        assert!(check_budget(&[spec(vec![-1, 64])], &[spec(vec![-1, 10])], 296).is_ok());
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-v1.onnx");
        let e = LoadedModel::load(
            &file,
            "d",
            1,
            ManifestId([0; 32]),
            &ServingSpec::default(),
            &GoldenSet::default(),
            &ServingLimits::new(100),
        )
        .unwrap_err();
        assert_eq!(e.0, ErrorClass::LoadError);
        assert!(e.1.contains("over the model memory budget"), "{}", e.1);
    }

    mod generated {
        use super::*;
        use crate::serving::onnx::build::{
            Attr, graph, model, node, seq_of_maps_value_info, value_info,
        };
        use crate::serving::onnx::tensor_proto;

        const F32: Option<i64> = Some(1);

        fn f32s(name: &str, shape: &[usize], v: &[f32]) -> Tensor {
            Tensor {
                name: name.into(),
                datatype: DType::F32,
                shape: shape.to_vec(),
                data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }
        }

        fn values(t: &Tensor) -> Vec<f32> {
            t.data
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }

        fn init(name: &str, dtype: DType, shape: &[u64], data: Vec<u8>) -> Vec<u8> {
            tensor_proto(&TensorData {
                name: name.into(),
                dtype,
                shape: shape.to_vec(),
                data,
            })
            .expect("tensor")
        }

        fn scalar_i64(name: &str, v: i64) -> TensorData {
            TensorData {
                name: name.into(),
                dtype: DType::I64,
                shape: vec![],
                data: v.to_le_bytes().to_vec(),
            }
        }

        /// Write `bytes` to a temporary file and load it.
        fn load(
            bytes: &[u8],
            spec: &ServingSpec,
            limits: &ServingLimits,
        ) -> Result<LoadedModel, (ErrorClass, String)> {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("m.onnx");
            std::fs::write(&path, bytes).expect("write");
            LoadedModel::load(
                &path,
                "m",
                1,
                ManifestId([0; 32]),
                spec,
                &GoldenSet::default(),
                limits,
            )
        }

        #[test]
        fn a_file_that_is_not_a_model_is_refused_from_its_first_fields() {
            let text = b"id,label\n1,cat\n2,dog\n".repeat(1000);
            for (what, bytes) in [
                ("zeros", vec![0u8; 1 << 20]),
                ("text", text),
                (
                    "a length past the end",
                    vec![0x3a, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3],
                ),
            ] {
                let e = load(&bytes, &ServingSpec::default(), &limits()).expect_err(what);
                assert_eq!(e.0, ErrorClass::LoadError, "{what}: {}", e.1);
                assert!(e.1.contains("is not an ONNX model"), "{what}: {}", e.1);
            }
        }

        /// `y = x + [1, 2, 3, 4]` with `x` of shape `[N, 4]`.
        fn batch_model() -> Vec<u8> {
            let w: Vec<u8> = [1f32, 2., 3., 4.]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            model(&graph(
                &[node("Add", "", &["x", "w"], &["y"], &[])],
                &[init("w", DType::F32, &[4], w)],
                &[value_info("x", F32, Some(&[Err("N"), Ok(4)]))],
                &[value_info("y", F32, Some(&[Err("N"), Ok(4)]))],
            ))
        }

        #[test]
        fn a_symbolic_batch_is_served_at_any_size_by_one_runnable() {
            let m = load(&batch_model(), &ServingSpec::default(), &limits()).expect("load");
            assert_eq!(m.inputs[0].shape, [-1, 4]);
            assert_eq!(m.specialisations(), None, "one runnable, symbols kept");
            let one = m.infer(&[f32s("x", &[1, 4], &[0.; 4])]).expect("batch 1");
            assert_eq!(values(&one[0]), [1., 2., 3., 4.]);
            let three = m.infer(&[f32s("x", &[3, 4], &[1.; 12])]).expect("batch 3");
            assert_eq!(three[0].shape, [3, 4]);
            assert_eq!(values(&three[0])[8..], [2., 3., 4., 5.]);
            let e = m.infer(&[f32s("x", &[2, 5], &[0.; 10])]).unwrap_err();
            assert!(matches!(e, ServeError::BadInput(_)), "{e}");
            // Outputs are sized before the run: a batch whose output passes the budget is
            // refused before anything is allocated for it.
            let small = ServingLimits::new(2048);
            let m = load(&batch_model(), &ServingSpec::default(), &small).expect("load");
            let e = m.infer(&[f32s("x", &[100, 4], &[0.; 400])]).unwrap_err();
            assert!(
                e.to_string().contains("output 'y' of shape [100, 4]"),
                "{e}"
            );
        }

        #[test]
        fn shaped_plans_serve_once_prepared_and_the_symbolic_one_meanwhile() {
            let bytes = Arc::new(batch_model());
            let mut m = load(&bytes, &ServingSpec::default(), &limits()).expect("load");
            let graph = onnx::parse_graph(&bytes).expect("graph");
            let unsupported = Arc::new(Mutex::new(None));
            let facts = m.facts.clone();
            let cache = shape_cache(
                &bytes,
                &facts,
                &graph,
                &ServingSpec::default(),
                1 << 30,
                2,
                unsupported,
            );
            let Engine::Symbolic { faster, .. } = &mut m.engine else {
                panic!("symbolic")
            };
            *faster = Some(Faster::new(cache));
            let x = f32s("x", &[3, 4], &[1.; 12]);
            // A shape's first request is served (symbolic plan) and prepares nothing; its
            // second starts the shape's preparation, and is served at once too.
            let first = m.infer(std::slice::from_ref(&x)).expect("served");
            assert_eq!(values(&first[0])[8..], [2., 3., 4., 5.]);
            assert_eq!(m.specialisations(), Some((0, 0)));
            let second = m.infer(std::slice::from_ref(&x)).expect("served");
            assert_eq!(values(&second[0]), values(&first[0]));
            let deadline = Instant::now() + Duration::from_secs(30);
            while m.specialisations() != Some((1, 1)) {
                assert!(Instant::now() < deadline, "{:?}", m.specialisations());
                std::thread::sleep(Duration::from_millis(10));
            }
            // Then the shape's own plan answers the same.
            let again = m.infer(std::slice::from_ref(&x)).expect("served");
            assert_eq!(again[0].shape, [3, 4]);
            assert_eq!(values(&again[0]), values(&first[0]));
            assert_eq!(m.specialisations(), Some((1, 1)));
        }

        /// A U-Net step: `y = Concat(x, ConvTranspose(MaxPool(x)))` with `x` of shape
        /// `[1, 1, H, W]`: tract cannot prove that the upsampled height is `H` again.
        fn unet_model() -> Vec<u8> {
            let w: Vec<u8> = [1f32; 4].iter().flat_map(|x| x.to_le_bytes()).collect();
            model(&graph(
                &[
                    node(
                        "MaxPool",
                        "",
                        &["x"],
                        &["p"],
                        &[
                            Attr::Ints("kernel_shape", vec![2, 2]),
                            Attr::Ints("strides", vec![2, 2]),
                        ],
                    ),
                    node(
                        "ConvTranspose",
                        "",
                        &["p", "w"],
                        &["u"],
                        &[Attr::Ints("strides", vec![2, 2])],
                    ),
                    node("Concat", "", &["x", "u"], &["y"], &[Attr::Int("axis", 1)]),
                ],
                &[init("w", DType::F32, &[1, 1, 2, 2], w)],
                &[value_info(
                    "x",
                    F32,
                    Some(&[Ok(1), Ok(1), Err("H"), Err("W")]),
                )],
                &[value_info("y", F32, None)],
            ))
        }

        #[test]
        fn a_model_needing_specialisation_is_prepared_per_shape_in_a_bounded_cache() {
            let limits = ServingLimits {
                specialisations: 2,
                ..ServingLimits::new(4096)
            };
            let m = load(&unet_model(), &ServingSpec::default(), &limits).expect("load");
            assert_eq!(
                m.specialisations(),
                Some((0, 0)),
                "nothing prepared before a request"
            );
            let image = |h: usize, w: usize| f32s("x", &[1, 1, h, w], &vec![1.; h * w]);
            let out = m.infer(&[image(4, 4)]).expect("4x4");
            assert_eq!(out[0].shape, [1, 2, 4, 4]);
            assert_eq!(values(&out[0])[16..], [1.; 16], "pooled and spread back");
            assert_eq!(m.infer(&[image(4, 6)]).expect("4x6")[0].shape, [1, 2, 4, 6]);
            m.infer(&[image(4, 4)]).expect("4x4 again");
            assert_eq!(
                m.specialisations(),
                Some((2, 2)),
                "one preparation per shape"
            );
            // A third shape evicts the least recently used one (4x6).
            m.infer(&[image(6, 6)]).expect("6x6");
            assert_eq!(m.specialisations(), Some((3, 2)));
            m.infer(&[image(4, 4)]).expect("4x4 still held");
            assert_eq!(m.specialisations(), Some((3, 2)));
            m.infer(&[image(4, 6)]).expect("4x6 again");
            assert_eq!(
                m.specialisations(),
                Some((4, 2)),
                "prepared again after eviction"
            );
            // A shape the model cannot take is the request's error, and is not tried twice.
            let e = m.infer(&[image(5, 5)]).unwrap_err();
            assert!(matches!(e, ServeError::BadInput(_)), "{e}");
            // Each shape is sized against the budget before it runs.
            let e = m.infer(&[image(24, 24)]).unwrap_err();
            assert!(e.to_string().contains("model memory budget"), "{e}");
        }

        /// `y = If(sr == 16000, then: x * 2, else: Concat(x, x))`, `x` of shape `[N, 4]`,
        /// `sr` a scalar: the branches' shapes differ, so tract cannot type the `If` unless
        /// `sr` is fixed.
        fn if_model() -> Vec<u8> {
            let two = init("two", DType::F32, &[], 2f32.to_le_bytes().to_vec());
            let then_g = graph(
                &[node("Mul", "", &["x", "two"], &["t"], &[])],
                &[two],
                &[],
                &[value_info("t", F32, None)],
            );
            let else_g = graph(
                &[node(
                    "Concat",
                    "",
                    &["x", "x"],
                    &["e"],
                    &[Attr::Int("axis", 1)],
                )],
                &[],
                &[],
                &[value_info("e", F32, None)],
            );
            model(&graph(
                &[
                    node(
                        "Constant",
                        "",
                        &[],
                        &["k"],
                        &[Attr::Tensor(
                            "value",
                            init("kv", DType::I64, &[], 16000i64.to_le_bytes().to_vec()),
                        )],
                    ),
                    node("Equal", "", &["sr", "k"], &["c"], &[]),
                    node(
                        "If",
                        "",
                        &["c"],
                        &["y"],
                        &[
                            Attr::Graph("then_branch", then_g),
                            Attr::Graph("else_branch", else_g),
                        ],
                    ),
                ],
                &[],
                &[
                    value_info("x", F32, Some(&[Err("N"), Ok(4)])),
                    value_info("sr", Some(7), Some(&[])),
                ],
                &[value_info("y", F32, None)],
            ))
        }

        #[test]
        fn a_constant_input_folds_its_if_and_a_different_value_is_refused() {
            let e = load(&if_model(), &ServingSpec::default(), &limits()).unwrap_err();
            assert_eq!(e.0, ErrorClass::UnsupportedOp, "{}", e.1);
            assert!(
                e.1.contains("node 'If_y' (If)") && e.1.contains("--const sr=VALUE"),
                "{}",
                e.1
            );
            let spec = ServingSpec {
                consts: vec![scalar_i64("sr", 16000)],
                ..ServingSpec::default()
            };
            let m = load(&if_model(), &spec, &limits()).expect("folded");
            assert_eq!(
                m.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
                ["x"],
                "sr is not asked for"
            );
            assert_eq!(
                m.specialisations(),
                None,
                "symbols kept once the If is gone"
            );
            let x = f32s("x", &[2, 4], &[1.; 8]);
            let out = m.infer(std::slice::from_ref(&x)).expect("without sr");
            assert_eq!(values(&out[0]), [2.; 8], "the then branch");
            let sr = |v: i64| Tensor {
                name: "sr".into(),
                datatype: DType::I64,
                shape: vec![1],
                data: v.to_le_bytes().to_vec(),
            };
            m.infer(&[x.clone(), sr(16000)])
                .expect("the same value is accepted");
            let e = m.infer(&[x.clone(), sr(8000)]).unwrap_err();
            assert!(
                matches!(&e, ServeError::BadInput(m) if m.contains("fixed at [16000]")),
                "{e}"
            );
            // The other value takes the other branch.
            let spec = ServingSpec {
                consts: vec![scalar_i64("sr", 8000)],
                ..ServingSpec::default()
            };
            let m = load(&if_model(), &spec, &limits()).expect("folded");
            let out = m.infer(&[x]).expect("the else branch");
            assert_eq!(out[0].shape, [2, 8]);
        }

        #[test]
        fn a_zipmap_at_an_output_is_served_as_the_probabilities_it_wraps() {
            let g = graph(
                &[
                    node(
                        "Softmax",
                        "",
                        &["X"],
                        &["probabilities"],
                        &[Attr::Int("axis", 1)],
                    ),
                    node(
                        "ZipMap",
                        "ai.onnx.ml",
                        &["probabilities"],
                        &["output_probability"],
                        &[Attr::Ints("classlabels_int64s", vec![0, 1, 2])],
                    ),
                ],
                &[],
                &[value_info("X", F32, Some(&[Err(""), Ok(3)]))],
                &[seq_of_maps_value_info("output_probability")],
            );
            let m = load(&model(&g), &ServingSpec::default(), &limits()).expect("load");
            assert_eq!(m.outputs[0].name, "output_probability");
            assert_eq!(m.outputs[0].datatype, DType::F32);
            let note = &m.notes["output_probability"];
            assert!(
                note.contains("ZipMap") && note.contains("0, 1, 2"),
                "{note}"
            );
            let out = m
                .infer(&[f32s("X", &[2, 3], &[0., 0., 0., 1., 1., 1.])])
                .expect("run");
            assert_eq!(out[0].shape, [2, 3]);
            assert!(values(&out[0]).iter().all(|p| (p - 1. / 3.).abs() < 1e-6));
        }

        #[test]
        fn a_scaler_is_served_as_the_sub_and_mul_it_defines() {
            let g = graph(
                &[node(
                    "Scaler",
                    "ai.onnx.ml",
                    &["X"],
                    &["variable"],
                    &[
                        Attr::Floats("offset", vec![1.0, -2.0]),
                        Attr::Floats("scale", vec![2.0, 0.5]),
                    ],
                )],
                &[],
                &[value_info("X", F32, Some(&[Err(""), Ok(2)]))],
                &[value_info("variable", F32, Some(&[Err(""), Ok(2)]))],
            );
            let m = load(&model(&g), &ServingSpec::default(), &limits()).expect("load");
            let out = m
                .infer(&[f32s("X", &[2, 2], &[1., 0., 3., 4.])])
                .expect("run");
            assert_eq!(out[0].shape, [2, 2]);
            assert_eq!(values(&out[0]), [0., 1., 4., 3.]);
        }

        /// Two stumps on feature 0 (`x <= 0.5` goes to leaf 1, else leaf 2) with leaf
        /// weights (1, 2) and (10, 20), base value 0.5, aggregated by `aggregate`.
        fn tree_regressor(aggregate: &str) -> Vec<u8> {
            let g = graph(
                &[node(
                    "TreeEnsembleRegressor",
                    "ai.onnx.ml",
                    &["X"],
                    &["variable"],
                    &[
                        Attr::Int("n_targets", 1),
                        Attr::Str("aggregate_function", aggregate),
                        Attr::Floats("base_values", vec![0.5]),
                        Attr::Ints("nodes_treeids", vec![0, 0, 0, 1, 1, 1]),
                        Attr::Ints("nodes_nodeids", vec![0, 1, 2, 0, 1, 2]),
                        Attr::Ints("nodes_featureids", vec![0, 0, 0, 0, 0, 0]),
                        Attr::Floats("nodes_values", vec![0.5, 0., 0., 0.5, 0., 0.]),
                        Attr::Strings(
                            "nodes_modes",
                            vec!["BRANCH_LEQ", "LEAF", "LEAF", "BRANCH_LEQ", "LEAF", "LEAF"],
                        ),
                        Attr::Ints("nodes_truenodeids", vec![1, 0, 0, 1, 0, 0]),
                        Attr::Ints("nodes_falsenodeids", vec![2, 0, 0, 2, 0, 0]),
                        Attr::Ints("target_treeids", vec![0, 0, 1, 1]),
                        Attr::Ints("target_nodeids", vec![1, 2, 1, 2]),
                        Attr::Ints("target_ids", vec![0, 0, 0, 0]),
                        Attr::Floats("target_weights", vec![1., 2., 10., 20.]),
                    ],
                )],
                &[],
                &[value_info("X", F32, Some(&[Err(""), Ok(2)]))],
                &[value_info("variable", F32, Some(&[Err(""), Ok(1)]))],
            );
            model(&g)
        }

        #[test]
        fn a_tree_ensemble_regressor_is_served_through_tracts_classifier() {
            let x = f32s("X", &[2, 2], &[0., 9., 1., 9.]);
            let m = load(&tree_regressor("SUM"), &ServingSpec::default(), &limits()).expect("load");
            assert_eq!(m.outputs[0].datatype, DType::F32);
            let out = m.infer(std::slice::from_ref(&x)).expect("run");
            assert_eq!(out[0].shape, [2, 1]);
            assert_eq!(values(&out[0]), [11.5, 22.5]);
            // AVERAGE divides the trees' sum, then adds the base value (onnxruntime's rule).
            let m = load(
                &tree_regressor("AVERAGE"),
                &ServingSpec::default(),
                &limits(),
            )
            .expect("load");
            let out = m.infer(&[x]).expect("run");
            assert_eq!(values(&out[0]), [6.0, 11.5]);
            // MAX is not written as a classifier: tract's refusal names the operator.
            let e = load(&tree_regressor("MAX"), &ServingSpec::default(), &limits()).unwrap_err();
            assert_eq!(e.0, ErrorClass::UnsupportedOp, "{}", e.1);
        }

        /// `DequantizeLinear(QuantizeLinear(x))` (scale 0.1, zero point 128), a Softmax,
        /// and the probabilities quantised to 1/255 and back: a QDQ classifier's head.
        fn qdq_softmax_model() -> Vec<u8> {
            let g = graph(
                &[
                    node("QuantizeLinear", "", &["x", "s1", "z1"], &["xq"], &[]),
                    node("DequantizeLinear", "", &["xq", "s1", "z1"], &["xd"], &[]),
                    node("Softmax", "", &["xd"], &["p"], &[Attr::Int("axis", 1)]),
                    node("QuantizeLinear", "", &["p", "s2", "z2"], &["pq"], &[]),
                    node("DequantizeLinear", "", &["pq", "s2", "z2"], &["y"], &[]),
                ],
                &[
                    init("s1", DType::F32, &[], 0.1f32.to_le_bytes().to_vec()),
                    init("z1", DType::U8, &[], vec![128]),
                    init("s2", DType::F32, &[], (1f32 / 255.).to_le_bytes().to_vec()),
                    init("z2", DType::U8, &[], vec![0]),
                ],
                &[value_info("x", F32, Some(&[Ok(1), Ok(4)]))],
                &[value_info("y", F32, Some(&[Ok(1), Ok(4)]))],
            );
            model(&g)
        }

        #[test]
        fn a_softmax_between_dequantize_and_quantize_answers_probabilities() {
            let m = load(&qdq_softmax_model(), &ServingSpec::default(), &limits()).expect("load");
            let out = m
                .infer(&[f32s("x", &[1, 4], &[1., -1., 0., 0.5])])
                .expect("run");
            // tract's integer softmax answered 1.0 for all four.
            let e: Vec<f32> = [1f32, -1., 0., 0.5].iter().map(|v| v.exp()).collect();
            let sum: f32 = e.iter().sum();
            let got = values(&out[0]);
            for (g, e) in got.iter().zip(&e) {
                assert!((g - e / sum).abs() <= 0.5 / 255. + 1e-6, "{got:?}");
            }
        }

        /// `y = x · (q · s)`: int8 weights `q` `[64, 96]` with a scale per output column,
        /// restored by `DequantizeLinear(axis=1)` before the `MatMul` (how a quantised
        /// variant stores its weights), `x` `[N, 64]`.
        fn int8_weights_model() -> (Vec<u8>, Vec<f32>) {
            let (k, n) = (64usize, 96usize);
            let q: Vec<i8> = (0..k * n)
                .map(|i| {
                    if i / n == i % n % k {
                        127 // every column reaches 127, as a symmetric quantiser's does
                    } else {
                        ((i * 7919 % 253) as i32 - 126) as i8
                    }
                })
                .collect();
            let scales: Vec<f32> = (0..n).map(|j| 0.002 + 0.0001 * j as f32).collect();
            let w: Vec<f32> = (0..k * n).map(|i| q[i] as f32 * scales[i % n]).collect();
            let g = graph(
                &[
                    node(
                        "DequantizeLinear",
                        "",
                        &["q", "s"],
                        &["w"],
                        &[Attr::Int("axis", 1)],
                    ),
                    node("MatMul", "", &["x", "w"], &["y"], &[]),
                ],
                &[
                    init(
                        "q",
                        DType::I8,
                        &[k as u64, n as u64],
                        q.iter().map(|v| *v as u8).collect(),
                    ),
                    init(
                        "s",
                        DType::F32,
                        &[n as u64],
                        scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ),
                ],
                &[value_info("x", F32, Some(&[Err("N"), Ok(k as i64)]))],
                &[value_info("y", F32, Some(&[Err("N"), Ok(n as i64)]))],
            );
            (model(&g), w)
        }

        /// The int8 matrix is served by the node's own product ([`super::super::int8`]),
        /// which computes what the file says to float32 rounding, for one row (a decoding
        /// step's kernel) and several (a prompt's); float16 weights would be off by up to
        /// 2^-11 of each weight.
        #[test]
        fn int8_weights_are_multiplied_as_the_file_says_one_row_or_several() {
            let (bytes, w) = int8_weights_model();
            let m = load(&bytes, &ServingSpec::default(), &limits()).expect("load");
            for rows in [1usize, 3] {
                let x: Vec<f32> = (0..rows * 64)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let out = m.infer(&[f32s("x", &[rows, 64], &x)]).expect("run");
                assert_eq!(out[0].shape, [rows, 96]);
                let got = values(&out[0]);
                for r in 0..rows {
                    for j in 0..96 {
                        let want: f64 = (0..64)
                            .map(|i| f64::from(x[r * 64 + i]) * f64::from(w[i * 96 + j]))
                            .sum();
                        let g = f64::from(got[r * 96 + j]);
                        assert!(
                            (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                            "{rows} rows, [{r}, {j}]: {g} against {want}"
                        );
                    }
                }
            }
        }

        /// A two-class forest in scikit-learn's form: every weight for class id 0 (tract's
        /// two-class layout, probabilities `[1 - s, s]`), one stump on feature 0 with
        /// `s = 0.2` for `x <= 0.5` and `0.9` above, labels 3 and 7.
        fn binary_classifier() -> Vec<u8> {
            let g = graph(
                &[node(
                    "TreeEnsembleClassifier",
                    "ai.onnx.ml",
                    &["X"],
                    &["label", "probabilities"],
                    &[
                        Attr::Ints("classlabels_int64s", vec![3, 7]),
                        Attr::Ints("nodes_treeids", vec![0, 0, 0]),
                        Attr::Ints("nodes_nodeids", vec![0, 1, 2]),
                        Attr::Ints("nodes_featureids", vec![0, 0, 0]),
                        Attr::Floats("nodes_values", vec![0.5, 0., 0.]),
                        Attr::Strings("nodes_modes", vec!["BRANCH_LEQ", "LEAF", "LEAF"]),
                        Attr::Ints("nodes_truenodeids", vec![1, 0, 0]),
                        Attr::Ints("nodes_falsenodeids", vec![2, 0, 0]),
                        Attr::Ints("class_treeids", vec![0, 0]),
                        Attr::Ints("class_nodeids", vec![1, 2]),
                        Attr::Ints("class_ids", vec![0, 0]),
                        Attr::Floats("class_weights", vec![0.2, 0.9]),
                    ],
                )],
                &[],
                &[value_info("X", F32, Some(&[Err(""), Ok(1)]))],
                &[
                    value_info("label", Some(7), Some(&[Err("")])),
                    value_info("probabilities", F32, Some(&[Err(""), Ok(2)])),
                ],
            );
            model(&g)
        }

        #[test]
        fn a_two_class_tree_classifier_labels_by_its_probabilities() {
            let m = load(&binary_classifier(), &ServingSpec::default(), &limits()).expect("load");
            let out = m.infer(&[f32s("X", &[2, 1], &[0., 1.])]).expect("run");
            let labels: Vec<i64> = out[0]
                .data
                .chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let p = values(&out[1]);
            assert!(
                (p[0] - 0.8).abs() < 1e-6 && (p[3] - 0.9).abs() < 1e-6,
                "{p:?}"
            );
            // tract's own label was 3 for both (the first class whenever s > 0).
            assert_eq!(labels, [3, 7]);
        }

        /// A three-class `LinearClassifier` over `[N, 2]` with `coefficients` floats.
        fn linear_classifier(coefficients: usize) -> Vec<u8> {
            let g = graph(
                &[node(
                    "LinearClassifier",
                    "ai.onnx.ml",
                    &["X"],
                    &["label", "scores"],
                    &[
                        Attr::Ints("classlabels_ints", vec![0, 1, 2]),
                        Attr::Floats("coefficients", vec![0.5; coefficients]),
                        Attr::Floats("intercepts", vec![0.0; 3]),
                    ],
                )],
                &[],
                &[value_info("X", F32, Some(&[Err(""), Ok(2)]))],
                &[
                    value_info("label", Some(7), Some(&[Err("")])),
                    value_info("scores", F32, Some(&[Err(""), Ok(3)])),
                ],
            );
            model(&g)
        }

        #[test]
        fn a_linear_classifier_whose_coefficients_do_not_fit_its_input_is_refused() {
            // onnxruntime's own logreg_iris.onnx: 12 coefficients, 3 classes, 2 features.
            let e = load(&linear_classifier(12), &ServingSpec::default(), &limits()).unwrap_err();
            assert_eq!(e.0, ErrorClass::LoadError, "{}", e.1);
            assert!(
                e.1.contains("12 coefficients for 3 classes")
                    && e.1.contains("'X' has 2 features (6 expected)"),
                "{}",
                e.1
            );
            load(&linear_classifier(6), &ServingSpec::default(), &limits()).expect("load");
        }

        #[test]
        fn an_operator_tract_lacks_is_refused_naming_the_node_and_operator() {
            let g = graph(
                &[node(
                    "SVMRegressor",
                    "ai.onnx.ml",
                    &["X"],
                    &["variable"],
                    &[],
                )],
                &[],
                &[value_info("X", F32, Some(&[Err(""), Ok(10)]))],
                &[value_info("variable", F32, Some(&[Err(""), Ok(1)]))],
            );
            let e = load(&model(&g), &ServingSpec::default(), &limits()).unwrap_err();
            assert_eq!(e.0, ErrorClass::UnsupportedOp, "{}", e.1);
            assert!(
                e.1.contains("SVMRegressor_variable") && e.1.contains("ai.onnx.ml:SVMRegressor"),
                "{}",
                e.1
            );
        }
    }
}
