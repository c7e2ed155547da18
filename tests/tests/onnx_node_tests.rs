//! The ONNX backend node tests through a node's activation path (issue 12): every case
//! that the `onnx` package defines (`onnx.backend.test.case.node`, about 1,900 operator
//! cases, written out by `scripts/corpus/export_node_tests.py`) is tried with its own test
//! data as the golden checks, then served again. Cases are served or refused with a
//! reason; none may be served and answer wrong.
//!
//! Needs Python with the pinned `onnx` (`scripts/test.sh` installs
//! `scripts/corpus/requirements.txt`); without it the test fails and says so.

use pollen_tests::{Pollen, workspace_dir};
use std::process::Command;

#[test]
fn no_onnx_node_test_case_is_served_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = tmp.path().join("cases");
    let script = workspace_dir().join("scripts/corpus/export_node_tests.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&cases)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "exporting the ONNX node tests failed (install them with `python3 -m pip install \
         --no-deps -r scripts/corpus/requirements.txt`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = tmp.path().join("summary.jsonl");
    let run = Pollen::in_dir(tmp.path()).run([
        "check-cases".to_string(),
        cases.display().to_string(),
        "--out".to_string(),
        summary.display().to_string(),
    ]);
    let text = run.success();
    eprintln!("{text}");
    let last = std::fs::read_to_string(&summary).unwrap();
    // The summary is the pretty JSON after the per-case lines.
    let at = last.find("{\n").expect("a summary");
    let s: serde_json::Value = serde_json::from_str(&last[at..]).unwrap();
    assert_eq!(s["wrong"], 0, "served but wrong: {}", s["wrong_cases"]);
    let (cases, served) = (s["cases"].as_u64().unwrap(), s["served"].as_u64().unwrap());
    assert!(cases > 1_500, "only {cases} cases exported");
    // A floor under today's figure, so that a change that refuses much more shows.
    assert!(served >= 985, "only {served} of {cases} cases served");
}
