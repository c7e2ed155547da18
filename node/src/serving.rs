//! Serving: models loaded in tract, golden checks, and the registry that swaps versions.
//!
//! A model is loaded, optimised and warmed on a blocking thread ([`LoadedModel::load`]),
//! never on the async runtime. Activation is load, then the manifest's golden checks, then
//! an atomic swap in the [`Registry`]: new requests see the new version, requests that
//! already hold the old `Arc` finish on it, and the old version stays loaded (warm) as the
//! previous one for an instant rollback.

use crate::kserve::{DataType, Tensor};
use pollen_protocol::ids::ManifestId;
use pollen_protocol::manifest::{DType, GoldenCheck, TensorData};
use pollen_protocol::rollout::ErrorClass;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use tract::prelude::*;

/// An input or output of a loaded model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoSpec {
    /// Name in the graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
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

/// How one inference ended, for the health window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// The request did not fit the model: the client's fault, not counted as an error.
    BadInput,
    /// The model failed.
    Error,
    /// The runtime panicked.
    Panic,
}

/// Latency buckets of the health window: bucket `i` holds latencies up to `1.25^i` µs
/// (about 25% resolution from 1 µs to over 100 s).
const LATENCY_BUCKETS: usize = 84;

/// What a model did over one report window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Requests that reached the model (bad input included).
    pub requests: u64,
    /// Requests the model failed (panics included).
    pub errors: u64,
    /// Runtime panics.
    pub panics: u64,
    /// Median latency of answered requests, µs (bucket upper bound; 0 when none).
    pub p50_us: u32,
    /// 99th percentile, µs.
    pub p99_us: u32,
}

/// The health a serving window amounts to: a crash loop when the runtime panicked
/// `crash_loop_panics` times, runtime errors when the window broke the plan's `limit`,
/// else healthy.
pub fn window_status(
    w: &WindowStats,
    limit: Option<pollen_protocol::rollout::RuntimeLimit>,
    crash_loop_panics: u64,
) -> pollen_protocol::rollout::HealthStatus {
    use pollen_protocol::rollout::HealthStatus;
    if w.panics >= crash_loop_panics.max(1) {
        HealthStatus::Failed {
            class: ErrorClass::CrashLoop,
            detail: format!(
                "the runtime panicked {} times in {} requests over the last window",
                w.panics, w.requests
            ),
        }
    } else if limit.is_some_and(|l| l.broken(w.requests, w.errors)) {
        HealthStatus::Failed {
            class: ErrorClass::RuntimeErrors,
            detail: format!(
                "{} of {} inferences failed over the last window",
                w.errors, w.requests
            ),
        }
    } else {
        HealthStatus::Ok
    }
}

/// Counters of the current report window of a served model: fixed size, lock held for a
/// few increments only.
#[derive(Debug)]
pub struct HealthWindow {
    inner: std::sync::Mutex<([u64; LATENCY_BUCKETS], u64, u64, u64)>,
}

impl Default for HealthWindow {
    fn default() -> Self {
        HealthWindow {
            inner: std::sync::Mutex::new(([0; LATENCY_BUCKETS], 0, 0, 0)),
        }
    }
}

fn bucket_of(us: f64) -> usize {
    if us <= 1.0 {
        return 0;
    }
    ((us.ln() / 1.25f64.ln()).ceil() as usize).min(LATENCY_BUCKETS - 1)
}

fn bucket_upper_us(i: usize) -> u32 {
    1.25f64.powi(i as i32).ceil().min(f64::from(u32::MAX)) as u32
}

impl HealthWindow {
    /// Count one request that took `elapsed`.
    pub fn record(&self, elapsed: std::time::Duration, outcome: Outcome) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1 += 1;
        match outcome {
            Outcome::Ok => g.0[bucket_of(elapsed.as_secs_f64() * 1e6)] += 1,
            Outcome::BadInput => {}
            Outcome::Error => g.2 += 1,
            Outcome::Panic => {
                g.2 += 1;
                g.3 += 1;
            }
        }
    }

    /// The window's figures; the window starts again empty.
    pub fn take(&self) -> WindowStats {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, requests, errors, panics) =
            std::mem::replace(&mut *g, ([0; LATENCY_BUCKETS], 0, 0, 0));
        drop(g);
        let answered: u64 = buckets.iter().sum();
        let pct = |q: f64| -> u32 {
            if answered == 0 {
                return 0;
            }
            let rank = ((answered as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return bucket_upper_us(i);
                }
            }
            bucket_upper_us(LATENCY_BUCKETS - 1)
        };
        WindowStats {
            requests,
            errors,
            panics,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
        }
    }
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
}

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

fn to_kserve(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        DatumType::I64 => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

fn to_tract(dt: DataType) -> Option<DatumType> {
    Some(match dt {
        DataType::Bool => DatumType::Bool,
        DataType::U8 => DatumType::U8,
        DataType::U16 => DatumType::U16,
        DataType::U32 => DatumType::U32,
        DataType::U64 => DatumType::U64,
        DataType::I8 => DatumType::I8,
        DataType::I16 => DatumType::I16,
        DataType::I32 => DatumType::I32,
        DataType::I64 => DatumType::I64,
        DataType::F16 => DatumType::F16,
        DataType::F32 => DatumType::F32,
        DataType::F64 => DatumType::F64,
        DataType::Bytes => return None,
    })
}

fn dtype_of(d: DType) -> Option<DataType> {
    Some(match d {
        DType::Bool => DataType::Bool,
        DType::U8 => DataType::U8,
        DType::U16 => DataType::U16,
        DType::U32 => DataType::U32,
        DType::U64 => DataType::U64,
        DType::I8 => DataType::I8,
        DType::I16 => DataType::I16,
        DType::I32 => DataType::I32,
        DType::I64 => DataType::I64,
        DType::F16 => DataType::F16,
        DType::F32 => DataType::F32,
        DType::F64 => DataType::F64,
        _ => return None,
    })
}

fn io_spec(name: String, fact: &Fact) -> Result<IoSpec, String> {
    let dt = fact.datum_type().map_err(|e| e.to_string())?;
    let datatype =
        to_kserve(dt).ok_or_else(|| format!("{name}: unsupported element type {dt:?}"))?;
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

impl LoadedModel {
    /// Load, optimise and warm an ONNX model. Blocking and CPU-bound: call it on a blocking
    /// thread. A panic inside tract is caught and reported as [`ErrorClass::Panic`].
    pub fn load(
        path: &Path,
        channel: &str,
        version: u64,
        manifest: ManifestId,
    ) -> Result<Self, (ErrorClass, String)> {
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
        let m = LoadedModel {
            channel: channel.to_string(),
            version,
            manifest,
            inputs,
            outputs,
            health: HealthWindow::default(),
            runnable,
        };
        m.warm()
            .map_err(|e| (ErrorClass::LoadError, format!("warm-up run failed: {e}")))?;
        Ok(m)
    }

    /// One run on zeros with every symbolic dimension at 1, so the first request does not
    /// pay for lazy initialisation.
    fn warm(&self) -> Result<(), ServeError> {
        let inputs: Vec<Tensor> = self
            .inputs
            .iter()
            .map(|s| {
                let shape: Vec<usize> = s
                    .shape
                    .iter()
                    .map(|d| if *d < 0 { 1 } else { *d as usize })
                    .collect();
                let n: usize = shape.iter().product();
                Tensor {
                    name: s.name.clone(),
                    datatype: s.datatype,
                    shape,
                    data: vec![0u8; n * s.datatype.size().unwrap_or(1)],
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
                    t.datatype.name(),
                    spec.datatype.name()
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
                let datatype = to_kserve(dt).ok_or_else(|| {
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

    /// Run the manifest's golden checks: every expected output within `tolerance`
    /// (absolute, for floats; exact for the rest).
    pub fn golden(&self, checks: &[GoldenCheck]) -> Result<(), String> {
        for (i, check) in checks.iter().enumerate() {
            let inputs: Vec<Tensor> = check
                .inputs
                .iter()
                .map(golden_tensor)
                .collect::<Result<_, _>>()?;
            let outputs = self
                .run(&inputs)
                .map_err(|e| format!("golden check {i}: {e}"))?;
            for want in &check.expected {
                let want = golden_tensor(want)?;
                let got = outputs
                    .iter()
                    .find(|o| o.name == want.name)
                    .ok_or_else(|| {
                        format!(
                            "golden check {i}: the model has no output {:?} (it has {:?})",
                            want.name,
                            self.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
                        )
                    })?;
                compare(&want, got, check.tolerance)
                    .map_err(|e| format!("golden check {i}, output '{}': {e}", want.name))?;
            }
        }
        Ok(())
    }
}

/// The graph output names of an ONNX model (`ModelProto.graph.output[].name`), read with
/// a minimal protobuf walk. None if the bytes do not parse.
pub fn onnx_graph_outputs(model: &[u8]) -> Option<Vec<String>> {
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// Length-delimited fields `want` of a message, as slices.
    fn fields(b: &[u8], want: u64) -> Option<Vec<&[u8]>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = varint(b, &mut i)?;
            match key & 7 {
                0 => {
                    varint(b, &mut i)?;
                }
                1 => i = i.checked_add(8)?,
                5 => i = i.checked_add(4)?,
                2 => {
                    let len = usize::try_from(varint(b, &mut i)?).ok()?;
                    let end = i.checked_add(len)?;
                    let slice = b.get(i..end)?;
                    if key >> 3 == want {
                        out.push(slice);
                    }
                    i = end;
                }
                _ => return None,
            }
        }
        Some(out)
    }
    let graph = *fields(model, 7)?.first()?;
    fields(graph, 12)?
        .into_iter()
        .map(|vi| {
            let name = *fields(vi, 1)?.first()?;
            String::from_utf8(name.to_vec()).ok()
        })
        .collect()
}

fn golden_tensor(t: &TensorData) -> Result<Tensor, String> {
    let datatype = dtype_of(t.dtype).ok_or("golden tensors need a fixed-size dtype")?;
    Ok(Tensor {
        name: t.name.clone(),
        datatype,
        shape: t.shape.iter().map(|d| *d as usize).collect(),
        data: t.data.clone(),
    })
}

fn compare(want: &Tensor, got: &Tensor, tol: f32) -> Result<(), String> {
    if want.datatype != got.datatype || want.shape != got.shape {
        return Err(format!(
            "expected {} {:?}, got {} {:?}",
            want.datatype.name(),
            want.shape,
            got.datatype.name(),
            got.shape
        ));
    }
    match want.datatype {
        DataType::F32 => {
            let w = want
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            let g = got
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            for (k, (a, b)) in w.zip(g).enumerate() {
                if (a - b).abs().is_nan() || (a - b).abs() > tol {
                    return Err(format!(
                        "element {k}: expected {a}, got {b} (tolerance {tol})"
                    ));
                }
            }
            Ok(())
        }
        DataType::F64 => {
            let w = want
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
            let g = got
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
            for (k, (a, b)) in w.zip(g).enumerate() {
                if (a - b).abs().is_nan() || (a - b).abs() > f64::from(tol) {
                    return Err(format!(
                        "element {k}: expected {a}, got {b} (tolerance {tol})"
                    ));
                }
            }
            Ok(())
        }
        _ if want.data == got.data => Ok(()),
        _ => Err("values differ".into()),
    }
}

#[derive(Debug, Default)]
struct Slot {
    current: Option<Arc<LoadedModel>>,
    previous: Option<Arc<LoadedModel>>,
}

/// The models this node serves: per channel the current version and the previous one,
/// kept warm.
#[derive(Debug, Default)]
pub struct Registry {
    slots: RwLock<BTreeMap<String, Slot>>,
}

impl Registry {
    /// Make `m` the current version of its channel; the current one becomes previous.
    pub fn activate(&self, m: Arc<LoadedModel>) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(m.channel.clone()).or_default();
        if slot
            .current
            .as_ref()
            .is_some_and(|c| c.manifest == m.manifest)
        {
            return;
        }
        slot.previous = slot.current.take();
        slot.current = Some(m);
    }

    /// Go back to the warm previous version if it is `manifest`; false if it is not loaded.
    pub fn roll_back_to(&self, channel: &str, manifest: &ManifestId) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.get_mut(channel) else {
            return false;
        };
        if slot
            .previous
            .as_ref()
            .is_some_and(|p| &p.manifest == manifest)
        {
            std::mem::swap(&mut slot.current, &mut slot.previous);
            return true;
        }
        false
    }

    /// Stop serving a channel.
    pub fn remove(&self, channel: &str) {
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(channel);
    }

    /// The current version of a channel.
    pub fn current(&self, channel: &str) -> Option<Arc<LoadedModel>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel)?
            .current
            .clone()
    }

    /// A loaded version (current or previous) of a channel.
    pub fn version(&self, channel: &str, version: u64) -> Option<Arc<LoadedModel>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let slot = slots.get(channel)?;
        [&slot.current, &slot.previous]
            .into_iter()
            .flatten()
            .find(|m| m.version == version)
            .cloned()
    }

    /// Loaded versions of a channel, current first.
    pub fn versions(&self, channel: &str) -> Vec<u64> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .get(channel)
            .map(|s| {
                [&s.current, &s.previous]
                    .into_iter()
                    .flatten()
                    .map(|m| m.version)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Channels with a current version.
    pub fn channels(&self) -> Vec<String> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter(|(_, s)| s.current.is_some())
            .map(|(c, _)| c.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_window_counts_and_percentiles() {
        let w = HealthWindow::default();
        for i in 0..98u64 {
            w.record(std::time::Duration::from_micros(100 + i), Outcome::Ok);
        }
        w.record(std::time::Duration::from_millis(50), Outcome::Ok);
        w.record(std::time::Duration::from_millis(50), Outcome::Ok);
        w.record(std::time::Duration::from_micros(10), Outcome::BadInput);
        w.record(std::time::Duration::from_micros(10), Outcome::Error);
        w.record(std::time::Duration::from_micros(10), Outcome::Panic);
        let s = w.take();
        assert_eq!((s.requests, s.errors, s.panics), (103, 2, 1));
        // Bucket bounds are within 25% above the true value.
        assert!((100..=186).contains(&s.p50_us), "p50 {}", s.p50_us);
        assert!((50_000..=62_500).contains(&s.p99_us), "p99 {}", s.p99_us);
        assert_eq!(
            w.take(),
            WindowStats::default(),
            "taking empties the window"
        );
    }

    #[test]
    fn windows_become_runtime_and_crash_loop_failures() {
        use pollen_protocol::rollout::{HealthStatus, RuntimeLimit};
        let limit = Some(RuntimeLimit {
            max_error_ppm: 50_000,
            min_requests: 20,
        });
        let w = |requests, errors, panics| WindowStats {
            requests,
            errors,
            panics,
            ..WindowStats::default()
        };
        let class = |s: HealthStatus| match s {
            HealthStatus::Failed { class, .. } => Some(class),
            _ => None,
        };
        // 5% of 100 is within the limit, 6% is not; 19 requests prove nothing.
        assert_eq!(class(window_status(&w(100, 5, 0), limit, 3)), None);
        assert_eq!(
            class(window_status(&w(100, 6, 0), limit, 3)),
            Some(ErrorClass::RuntimeErrors)
        );
        assert_eq!(class(window_status(&w(19, 19, 0), limit, 3)), None);
        // Without a limit in the plan errors alone never fail; panics still do.
        assert_eq!(class(window_status(&w(100, 90, 0), None, 3)), None);
        assert_eq!(
            class(window_status(&w(10, 3, 3), None, 3)),
            Some(ErrorClass::CrashLoop)
        );
        assert_eq!(class(window_status(&w(10, 2, 2), None, 3)), None);
    }
}
