//! A model version loaded in tract: load, optimise and warm it ([`LoadedModel::load`],
//! blocking), and run it on KServe tensors ([`LoadedModel::run`]), checking names, data
//! types and shapes first.

use super::golden::GoldenSet;
use super::health::HealthWindow;
use super::kserve::{DATATYPES, Tensor};
use super::onnx::onnx_graph_outputs;
use pollen_protocol::ids::ManifestId;
use pollen_protocol::manifest::DType;
use pollen_protocol::rollout::ErrorClass;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tract::prelude::*;

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
}

/// What loading produces: the runnable and its inputs and outputs.
type Loaded = (Runnable, Vec<IoSpec>, Vec<IoSpec>);

/// A model version ready to serve.
pub struct LoadedModel {
    /// Channel (the model name).
    pub channel: String,
    /// Manifest version.
    pub version: u64,
    /// Manifest id.
    pub manifest: ManifestId,
    /// Inputs, in graph order.
    pub inputs: Vec<IoSpec>,
    /// Outputs, in graph order.
    pub outputs: Vec<IoSpec>,
    /// Requests, errors and latency since the last health report.
    pub health: HealthWindow,
    runnable: Runnable,
    /// The golden checks it passed at activation ([`LoadedModel::keep_golden`]), run again
    /// to decide who is at fault when a request fails ([`LoadedModel::at_fault`]).
    golden: GoldenSet,
    /// The latest verdict of such a re-run: when, and whether the model failed it.
    recheck: Mutex<Option<(Instant, bool)>>,
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
    let elements = s.shape.iter().try_fold(1u64, |n, d| {
        n.checked_mul(if *d < 0 { 1 } else { *d as u64 })
    })?;
    elements.checked_mul(s.datatype.size().unwrap_or(1) as u64)
}

/// The inputs and outputs of a warm-up run fit in `budget` bytes together.
fn check_budget(inputs: &[IoSpec], outputs: &[IoSpec], budget: u64) -> Result<(), String> {
    let mut total = 0u64;
    for (kind, s) in inputs
        .iter()
        .map(|s| ("input", s))
        .chain(outputs.iter().map(|s| ("output", s)))
    {
        let bytes = tensor_bytes(s);
        let sum = bytes.and_then(|b| total.checked_add(b));
        total = sum.unwrap_or(u64::MAX);
        if sum.is_none() || total > budget {
            return Err(format!(
                "{kind} '{}' of shape {:?} needs {} bytes: the model's tensors exceed the \
                 model memory budget of {budget} bytes",
                s.name,
                s.shape,
                bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
            ));
        }
    }
    Ok(())
}

impl LoadedModel {
    /// Load, optimise and warm an ONNX model. Blocking and CPU-bound: call it on a blocking
    /// thread. A panic inside tract is caught and reported as [`ErrorClass::Panic`].
    ///
    /// Sizes are checked before anything is allocated: a file larger than `budget` bytes,
    /// or fixed input and output shapes whose tensors would take more than `budget` bytes
    /// together (or overflow), are a [`ErrorClass::LoadError`] naming the culprit. The
    /// budget does not bound what tract allocates while it optimises; the trial run in a
    /// child process ([`super::trial`]) does.
    pub fn load(
        path: &Path,
        channel: &str,
        version: u64,
        manifest: ManifestId,
        budget: u64,
    ) -> Result<Self, (ErrorClass, String)> {
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
        let path = path.to_path_buf();
        let result = std::panic::catch_unwind(move || -> Result<Loaded, (ErrorClass, String)> {
            let load = |e: anyhow::Error| (ErrorClass::LoadError, format!("{e:#}"));
            // Read once: tract loads from the buffer, and the graph's output names come from it.
            let bytes = std::fs::read(&path)
                .map_err(|e| (ErrorClass::Unavailable, format!("{}: {e}", path.display())))?;
            let inference = onnx().map_err(load)?.load_buffer(&bytes).map_err(load)?;
            let model = inference.into_model().map_err(|e| {
                let msg = format!("{e:#}");
                let class = if msg.contains("Unimplemented")
                    || msg.contains("not supported")
                    || msg.contains("unsupported")
                {
                    ErrorClass::UnsupportedOp
                } else {
                    ErrorClass::LoadError
                };
                (class, msg)
            })?;
            let mut inputs = Vec::new();
            for i in 0..model.input_count().map_err(load)? {
                let name = model.input_name(i).map_err(load)?;
                let fact = model.input_fact(i).map_err(load)?;
                inputs.push(io_spec(name, &fact).map_err(|e| (ErrorClass::UnsupportedOp, e))?);
            }
            let mut outputs = Vec::new();
            for i in 0..model.output_count().map_err(load)? {
                let name = model.output_name(i).map_err(load)?;
                let fact = model.output_fact(i).map_err(load)?;
                outputs.push(io_spec(name, &fact).map_err(|e| (ErrorClass::UnsupportedOp, e))?);
            }
            // tract names outputs by their node; clients use the graph's output names.
            if let Some(names) = onnx_graph_outputs(&bytes)
                && names.len() == outputs.len()
            {
                for (o, n) in outputs.iter_mut().zip(names) {
                    o.name = n;
                }
            }
            let runnable = model.into_runnable().map_err(load)?;
            Ok((runnable, inputs, outputs))
        });
        let (runnable, inputs, outputs) = match result {
            Ok(r) => r?,
            Err(_) => {
                return Err((
                    ErrorClass::Panic,
                    "tract panicked while loading the model".into(),
                ));
            }
        };
        check_budget(&inputs, &outputs, budget).map_err(|e| (ErrorClass::LoadError, e))?;
        let m = LoadedModel {
            channel: channel.to_string(),
            version,
            manifest,
            inputs,
            outputs,
            health: HealthWindow::default(),
            runnable,
            golden: GoldenSet::default(),
            recheck: Mutex::new(None),
        };
        m.warm()
            .map_err(|e| (ErrorClass::LoadError, format!("warm-up run failed: {e}")))?;
        Ok(m)
    }

    /// Keep the golden checks the model just passed, for [`LoadedModel::at_fault`].
    pub fn keep_golden(&mut self, checks: GoldenSet) {
        self.golden = checks;
    }

    /// A request made the model fail (an error or a caught panic): is the model at fault,
    /// rather than the request's input? Only when the model now fails its own golden
    /// checks, re-run here (at most once per [`RECHECK_INTERVAL`]; the verdict holds in
    /// between). A model without golden checks passed its warm-up run at activation, so
    /// a failure is the input's. This is what keeps one client from failing a rollout:
    /// its requests are answered 400 and count as bad input, not as model errors.
    pub fn at_fault(&self) -> bool {
        if self.golden.is_empty() {
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

    /// One run on zeros with every symbolic dimension at 1, so the first request does not
    /// pay for lazy initialisation.
    fn warm(&self) -> Result<(), ServeError> {
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
        self.run(&inputs).map(|_| ())
    }

    /// Check `inputs` against the model (names, types, shapes) and run it. Outputs are in
    /// graph order. A panic inside tract is caught and returned as a runtime error.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ServeError> {
        if let Some(extra) = inputs
            .iter()
            .find(|t| !self.inputs.iter().any(|s| s.name == t.name))
        {
            return Err(ServeError::BadInput(format!(
                "unknown input '{}': the model takes {}",
                extra.name,
                self.inputs
                    .iter()
                    .map(|s| format!("'{}'", s.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
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
            let dt = to_tract(t.datatype).ok_or_else(|| {
                ServeError::BadInput(format!("input '{}': BYTES is not supported", t.name))
            })?;
            let tensor = tract::prelude::Tensor::from_bytes(dt, &t.shape, &t.data)
                .map_err(|e| ServeError::BadInput(format!("input '{}': {e}", t.name)))?;
            ordered.push(tensor);
        }
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.runnable.run(ordered)));
        let outs = match result {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(ServeError::Runtime(format!("{e:#}"))),
            Err(_) => return Err(ServeError::Panicked),
        };
        outs.into_iter()
            .zip(&self.outputs)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_protocol::manifest::{GoldenCheck, TensorData};

    fn digits() -> LoadedModel {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-v1.onnx");
        LoadedModel::load(&path, "digits", 1, ManifestId([0; 32]), 1 << 30).expect("load")
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
        let e = LoadedModel::load(&file, "d", 1, ManifestId([0; 32]), 100).unwrap_err();
        assert_eq!(e.0, ErrorClass::LoadError);
        assert!(e.1.contains("over the model memory budget"), "{}", e.1);
    }
}
