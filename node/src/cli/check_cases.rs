//! `pollen check-cases DIR` (hidden): every ONNX test case in DIR through the activation
//! path, with its own test data as the golden checks, then served again in this process.
//!
//! A case is `DIR/<name>/model.onnx` with `test_data_set_N/{input_K.pb, output_K.pb}`
//! (the layout of the ONNX backend node tests, written by
//! `scripts/corpus/export_node_tests.py`, which also writes `DIR/cases.json` with each
//! case's tolerances). Each case ends in one of three outcomes:
//!
//! * **served**: the trial run (a child process under the memory budget: load, optimise,
//!   warm up, golden checks on every data set) passed, and the model loaded here answers
//!   every data set within the case's tolerances;
//! * **refused**, with the class and reason: the test data cannot be golden checks
//!   (sequences, bfloat16, …), or the activation failed (an operator tract lacks, a
//!   golden mismatch, …);
//! * **wrong**: activated, yet answering a data set beyond its tolerances. This must never
//!   happen; the command exits 1 if it does.

use anyhow::{Context, Result};
use pollen_node::serving::{GoldenSet, LoadedModel, ServingLimits, trial};
use pollen_protocol::ids::ManifestId;
use pollen_protocol::manifest::ServingSpec;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The memory budget of each case's trial (the node tests are small).
const BUDGET: u64 = 2 << 30;
/// The longest trial of one case.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One case's outcome.
#[derive(Debug, Serialize)]
struct Outcome {
    name: String,
    outcome: &'static str,
    class: Option<String>,
    reason: Option<String>,
}

/// What the command prints and writes.
#[derive(Debug, Serialize)]
struct Summary {
    cases: usize,
    served: usize,
    refused: usize,
    wrong: usize,
    refused_by_class: BTreeMap<String, usize>,
    wrong_cases: Vec<String>,
    seconds: f64,
}

/// Tolerances per case from `cases.json` (default: the ONNX backend runner's).
fn tolerances(dir: &Path) -> BTreeMap<String, (f32, f32)> {
    let Ok(text) = std::fs::read_to_string(dir.join("cases.json")) else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return BTreeMap::new();
    };
    v["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c["name"].as_str()?.to_string(),
                (c["atol"].as_f64()? as f32, c["rtol"].as_f64()? as f32),
            ))
        })
        .collect()
}

fn one(exe: &Path, case: &Path, tol: (f32, f32)) -> Outcome {
    let name = case
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let model = case.join("model.onnx");
    let refused = |class: String, reason: String| Outcome {
        name: name.clone(),
        outcome: "refused",
        class: Some(class),
        reason: Some(reason.chars().take(300).collect()),
    };
    let checks = match pollen_keys::golden::golden_from_dir(case, &model, tol.0) {
        Ok(c) => c,
        Err(e) => return refused("TestData".into(), format!("{e:#}")),
    };
    let set = GoldenSet {
        rtol: vec![tol.1; checks.len()],
        checks,
    };
    let spec = ServingSpec::default();
    if let Err((class, reason)) = trial::run(exe, &model, &set, &spec, None, BUDGET, TIMEOUT) {
        return refused(format!("{class:?}"), reason);
    }
    // Served here as a node serves it: loaded in this process, every data set run again.
    let limits = ServingLimits::new(BUDGET);
    let wrong = |reason: String| Outcome {
        name: name.clone(),
        outcome: "wrong",
        class: None,
        reason: Some(reason),
    };
    match LoadedModel::load(&model, "case", 1, ManifestId([0; 32]), &spec, &set, &limits) {
        Ok(m) => match m.golden(&set) {
            Ok(()) => Outcome {
                name: name.clone(),
                outcome: "served",
                class: None,
                reason: None,
            },
            Err(e) => wrong(e),
        },
        Err((class, e)) => wrong(format!(
            "passed its trial, then failed to load: {class:?}: {e}"
        )),
    }
}

/// Run every case under `dir`; write one JSON line per case and the summary to `out`.
pub fn run(dir: &Path, out: Option<&Path>, w: &mut impl Write) -> Result<()> {
    let exe = std::env::current_exe().context("the pollen binary")?;
    let tol = tolerances(dir);
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    cases.sort();
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut summary = Summary {
        cases: cases.len(),
        served: 0,
        refused: 0,
        wrong: 0,
        refused_by_class: BTreeMap::new(),
        wrong_cases: Vec::new(),
        seconds: 0.0,
    };
    for case in &cases {
        let name = case.file_name().map(|n| n.to_string_lossy().into_owned());
        let t = name
            .as_ref()
            .and_then(|n| tol.get(n))
            .copied()
            .unwrap_or((1e-7, 1e-3));
        let o = one(&exe, case, t);
        match o.outcome {
            "served" => summary.served += 1,
            "refused" => {
                summary.refused += 1;
                *summary
                    .refused_by_class
                    .entry(o.class.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            _ => {
                summary.wrong += 1;
                summary.wrong_cases.push(o.name.clone());
                writeln!(w, "WRONG {}: {}", o.name, o.reason.as_deref().unwrap_or(""))?;
            }
        }
        lines.push(serde_json::to_string(&o)?);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    let text = serde_json::to_string_pretty(&summary)?;
    writeln!(w, "{text}")?;
    if let Some(out) = out {
        lines.push(text);
        std::fs::write(out, lines.join("\n") + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    anyhow::ensure!(
        summary.wrong == 0,
        "{} cases activated but answered wrong: {:?}",
        summary.wrong,
        summary.wrong_cases
    );
    Ok(())
}
