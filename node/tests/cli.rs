//! The `pollen` binary answers `--help` and `--version`. Having an integration test here
//! also makes `cargo test --workspace --all-features` build the binary with the same
//! features as the tests, so `scripts/test.sh` compiles the workspace once, not twice.

use std::process::Command;

#[test]
fn help_and_version() {
    let bin = env!("CARGO_BIN_EXE_pollen");
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run pollen");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for cmd in ["run", "publish", "status", "rollout", "keys", "demo"] {
        assert!(text.contains(cmd), "--help lists {cmd}:\n{text}");
    }
    assert!(
        !text.contains("trial-model"),
        "internal commands stay hidden"
    );
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .expect("run pollen");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("pollen "));
}
