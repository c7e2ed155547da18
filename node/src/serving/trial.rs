//! A model's trial run in a child process under a memory limit, before the node loads it.
//!
//! A signed model can still be too big for this device, or make tract allocate without
//! bound while it optimises or runs. In the node's own process either would abort
//! everything (an allocation failure cannot be caught), so the actor first runs the whole
//! activation (load, optimise, warm up, golden checks) in `pollen trial-model`, a child
//! with its address space capped at the node's model memory budget. Only a model whose
//! trial passed is loaded in the node. A child that aborts, is killed or runs past the
//! timeout is a clean failed activation with its reason; the node never notices more
//! than a failed child.

use super::{GoldenSet, LoadedModel, ServingLimits};
use pollen_protocol::ids::ManifestId;
use pollen_protocol::manifest::ServingSpec;
use pollen_protocol::rollout::ErrorClass;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address space the child needs beyond the model itself: the binary's mappings, thread
/// stacks and allocator arenas.
const CHILD_OVERHEAD: u64 = 1 << 30;

/// The child's verdict, one JSON line on its stdout.
#[derive(Debug, Serialize, Deserialize)]
struct Verdict {
    /// `None`: loaded, warmed and passed its golden checks.
    failure: Option<(ErrorClass, String)>,
}

/// What the child reads from its `--golden` file (postcard): the golden checks, how the
/// manifest says to prepare the model, and for a language model its tokenizer and
/// generation config files.
type TrialInput = (GoldenSet, ServingSpec, Option<LmFiles>);

/// A language model's tokenizer and generation config files.
pub type LmFiles = (PathBuf, PathBuf);

/// What `pollen trial-model` does in the child: cap the address space at `budget` (plus
/// the process's own overhead), then load the model as the manifest's serving spec says
/// and run its golden checks (a postcard [`TrialInput`] in `golden`), and print the
/// verdict.
pub fn child_main(model: &Path, golden: &Path, budget: u64) -> anyhow::Result<()> {
    limit_address_space(budget.saturating_add(CHILD_OVERHEAD))?;
    let failure = (|| {
        let bytes = std::fs::read(golden)
            .map_err(|e| (ErrorClass::Other, format!("{}: {e}", golden.display())))?;
        let (checks, spec, lm_files): TrialInput = postcard::from_bytes(&bytes)
            .map_err(|e| (ErrorClass::Other, format!("golden checks: {e}")))?;
        let limits = ServingLimits::new(budget);
        let m = LoadedModel::load(
            model,
            "trial",
            0,
            ManifestId([0; 32]),
            &spec,
            &checks,
            &limits,
        )
        .map_err(|(c, e)| (super::classify::classify(&e, c), e))?;
        m.check_golden(&checks)
            .map_err(|(c, e)| (super::classify::classify(&e, c), e))?;
        if let (Some(lm), Some((tokenizer, config))) = (&spec.lm, &lm_files) {
            super::lm::LmModel::new(&m, tokenizer, config, &limits)?.check_golden(lm, 0)?;
        }
        Ok(())
    })()
    .err();
    let line = serde_json::to_string(&Verdict { failure })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

// The one unsafe call of the node: libc's setrlimit has no safe wrapper in std.
#[allow(unsafe_code)]
fn limit_address_space(bytes: u64) -> anyhow::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass; no memory is shared.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
    anyhow::ensure!(rc == 0, "setrlimit: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Run the trial of `model` with `golden`, prepared as `spec` says, in a child process of
/// `exe` (the `pollen` binary) under `budget` bytes, waiting at most `timeout`. Blocking:
/// call it on a blocking thread.
pub fn run(
    exe: &Path,
    model: &Path,
    golden: &GoldenSet,
    spec: &ServingSpec,
    lm_files: Option<&LmFiles>,
    budget: u64,
    timeout: Duration,
) -> Result<(), (ErrorClass, String)> {
    let other = |what: &str, e: &dyn std::fmt::Display| (ErrorClass::Other, format!("{what}: {e}"));
    let mut golden_file = tempfile::NamedTempFile::new().map_err(|e| other("trial", &e))?;
    let bytes =
        postcard::to_allocvec(&(golden, spec, lm_files)).map_err(|e| other("golden checks", &e))?;
    golden_file
        .write_all(&bytes)
        .map_err(|e| other("trial", &e))?;
    let mut child = Command::new(exe)
        .arg("trial-model")
        .arg("--model")
        .arg(model)
        .arg("--golden")
        .arg(golden_file.path())
        .arg("--budget")
        .arg(budget.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| other("starting the trial process", &e))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err((
                    ErrorClass::LoadError,
                    format!(
                        "the model's trial run did not finish within {} s",
                        timeout.as_secs()
                    ),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(other("waiting for the trial process", &e)),
        }
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
    }
    match serde_json::from_str::<Verdict>(out.trim()) {
        Ok(Verdict { failure: None }) if status.success() => Ok(()),
        Ok(Verdict {
            failure: Some(failure),
        }) => Err(failure),
        _ => Err((
            ErrorClass::LoadError,
            format!(
                "the model's trial run died ({status}): it needs more memory than the \
                 model memory budget of {budget} bytes, or the runtime crashed"
            ),
        )),
    }
}
