//! # pollen-tests: end-to-end tests that run the real `pollen` binary
//!
//! The tests live in `tests/`; this library holds what they share. [`pollen_bin`] finds
//! (building it once if needed) the binary under test, and [`Pollen`] runs it and checks
//! the outcome with messages that show the command and its output.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `pollen` binary under test.
///
/// `POLLEN_BIN`, when set, names it. Otherwise `cargo build -p pollen-node --bin pollen`
/// runs once per test process (with the workspace's target dir: `CARGO_TARGET_DIR`, taken
/// relative to the workspace root when relative, or `<workspace>/target`) and its debug
/// binary is returned.
///
/// Panics, failing the test, when the build fails or the binary is not there: an
/// end-to-end test never skips silently.
pub fn pollen_bin() -> PathBuf {
    BIN.get_or_init(find_or_build).clone()
}

static BIN: OnceLock<PathBuf> = OnceLock::new();

/// Use `bin` as the binary under test (benchmarks pick the release build next to them).
/// Has no effect once [`pollen_bin`] was called.
pub fn set_pollen_bin(bin: PathBuf) {
    let _ = BIN.set(bin);
}

fn find_or_build() -> PathBuf {
    if let Some(bin) = std::env::var_os("POLLEN_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "POLLEN_BIN={} does not name an existing file",
            bin.display()
        );
        return bin;
    }
    let workspace = workspace_dir();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => workspace.join(t),
        None => workspace.join("target"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "-p", "pollen-node", "--bin", "pollen"])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(&workspace)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} to build pollen: {e}", cargo.display()));
    assert!(
        out.status.success(),
        "`cargo build -p pollen-node --bin pollen` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target
        .join("debug")
        .join(format!("pollen{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "built pollen, but {} is not there",
        bin.display()
    );
    bin
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// What a finished `pollen` run printed, and how it ended.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub command: String,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
}

impl Run {
    fn from_output(command: String, out: Output) -> Self {
        Run {
            command,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code(),
        }
    }

    /// Panic unless it exited with 0; returns standard output.
    pub fn success(self) -> String {
        assert_eq!(self.code, Some(0), "`{}` failed:\n{self}", self.command);
        self.stdout
    }

    /// Panic unless it exited with a non-zero code; returns standard error.
    pub fn failure(self) -> String {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "`{}` should have failed:\n{self}",
            self.command
        );
        self.stderr
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `pollen` in a working directory.
#[derive(Debug, Clone)]
pub struct Pollen {
    bin: PathBuf,
    dir: PathBuf,
}

/// The API token every test node is started with (written to its `api-token` before its
/// first start), so that CLI calls in tests find it through `POLLEN_API_TOKEN`.
pub const TEST_TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

impl Pollen {
    /// Run the binary of [`pollen_bin`] with `dir` as working directory.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Pollen {
            bin: pollen_bin(),
            dir: dir.into(),
        }
    }

    /// Run `pollen ARGS…` to completion (standard input empty).
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let command = std::iter::once("pollen".into())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<String>>()
            .join(" ");
        let out = Command::new(&self.bin)
            .args(&args)
            .current_dir(&self.dir)
            // Every test node shares this token (see `mesh::Node::start_in`).
            .env("POLLEN_API_TOKEN", TEST_TOKEN)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        Run::from_output(command, out)
    }
}

pub mod bed;
pub mod mesh;
pub mod onnxgen;
