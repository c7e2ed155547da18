//! Loading scenario files: mistakes are refused with an error that names them.

use pollen_sim::scenario;
use std::path::Path;

/// Scenario mistakes are errors that name the problem, not silent defaults.
#[test]
fn bad_scenarios_are_refused_clearly() {
    let base = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci-small.toml"),
    )
    .unwrap();
    let check = |text: String, want: &str| {
        let dir = tempfile_dir();
        let p = dir.join("s.toml");
        std::fs::write(&p, text).unwrap();
        let e = format!("{:#}", scenario::Scenario::load(&p).unwrap_err());
        assert!(e.contains(want), "{want:?} not in {e:?}");
    };
    check(
        base.replace("name = \"ci-small\"", "name = \"x\"\nnodez = 3"),
        "nodez",
    );
    check(base.replace("\"100Mbit\"", "\"100 furlongs\""), "furlongs");
    check(
        base.replace("version = 2", "version = 1"),
        "strictly increase",
    );
    check(base.replace("\"256KiB\"", "\"1000B\""), "chunk");
    check(
        base.replace("corrupt = 0.05", "corrupt = 0.9"),
        "adversary shares",
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pollen-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
