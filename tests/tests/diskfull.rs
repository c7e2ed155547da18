//! A full disk is an error in the status and the log, not a crash. The data dir sits on a
//! small tmpfs the test mounts (and unmounts); skipped with a message where mounting is not
//! possible (not root).

use pollen_tests::mesh::{Node, Operator, test_bytes};
use std::process::Command;
use std::time::Duration;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn full_disk_is_reported_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIP: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP: cannot run mount: {e}");
            return;
        }
    }
    let _mount = Mount(small.clone());
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    let publisher = Node::start(&tmp.path().join("pub"), &trust);
    let file = tmp.path().join("model.onnx");
    std::fs::write(&file, test_bytes(12 << 20, 8)).unwrap();
    let m = op.manifest(std::slice::from_ref(&file), "vision.defects", 1, 1 << 20);
    assert_eq!(publisher.publish(&m, std::slice::from_ref(&file)).0, 200);
    let mut args = trust.clone();
    args.extend(["--bootstrap".to_string(), publisher.addr()]);
    let mut node = Node::start(&small.join("node"), &args);
    let s = node.wait(
        Duration::from_secs(60),
        "a store error in the status",
        |s| {
            s.errors
                .iter()
                .any(|e| e.contains("disk full") || e.contains("No space"))
        },
    );
    assert!(node.running(), "the node is still running");
    assert!(!Node::has_release(&s, "vision.defects", 1));
    assert!(node.metric("pollen_store_errors_total") >= 1.0);
    eprintln!("reported: {:?}", s.errors.last());
}
