//! `pollen demo`: a whole local mesh, one command, on the embedded defaults.
//!
//! Generates an operator key and a trust root in a temporary directory, starts five
//! `pollen run` processes on loopback in two sites (mDNS off, bootstrap addresses instead),
//! publishes the bundled digits model with a staged rollout, shows the spread live, sends a
//! real inference request once every node serves, then publishes version 2 and shows the
//! swap. It leaves the mesh running for you to try with curl until Ctrl-C, and cleans up
//! on exit (set `POLLEN_DEMO_EXIT=1` to stop right after the tour).

use anyhow::{Context, Result, bail};
use pollen_keys::manifest::{self as mf, NewManifest};
use pollen_node::client::{ApiError, NodeClient};
use pollen_node::status::Status;
use pollen_protocol::chunking::ChunkSize;
use pollen_protocol::manifest::{Channel, Manifest};
use pollen_protocol::rollout::Gate;
use pollen_protocol::signing::Signed;
use pollen_protocol::trust::{ChannelPattern, TrustRootBody};
use pollen_protocol::{PublicKey, SigningKey};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MODEL_V1: &[u8] = include_bytes!("../../../models/digits-v1.onnx");
const MODEL_V2: &[u8] = include_bytes!("../../../models/digits-v2.onnx");
const GOLDEN_V1: &str = include_str!("../../../models/golden-v1.json");
const GOLDEN_V2: &str = include_str!("../../../models/golden-v2.json");
const CHANNEL: &str = "digits";

struct DemoNodes {
    dir: tempfile::TempDir,
    nodes: Vec<DemoNode>,
}

struct DemoNode {
    name: String,
    site: &'static str,
    child: Child,
    http: String,
    addr: String,
}

impl Drop for DemoNodes {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        eprintln!(
            "stopped {} nodes; removed {}",
            self.nodes.len(),
            self.dir.path().display()
        );
    }
}

/// A client of the demo node whose HTTP API is at `http` (host:port).
fn client(http: &str) -> NodeClient {
    NodeClient::new(&format!("http://{http}"), Duration::from_secs(30))
}

fn status(http: &str) -> Option<Status> {
    client(http).try_status()
}

fn start(
    bin: &Path,
    dir: &Path,
    name: &str,
    site: &'static str,
    trust: &Path,
    boot: &[String],
) -> Result<DemoNode> {
    let data = dir.join(name);
    std::fs::create_dir_all(&data)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--http",
        "127.0.0.1:0",
        "--no-mdns",
        "--site",
        site,
    ])
    .arg("--data-dir")
    .arg(&data)
    .arg("--trust")
    .arg(trust)
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    for b in boot {
        cmd.args(["--bootstrap", b]);
    }
    let child = cmd.spawn().context("starting pollen run")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = loop {
        if let Ok(s) = std::fs::read_to_string(data.join("http.addr"))
            && !s.trim().is_empty()
            && let Some(st) = status(s.trim())
            && !st.listen.is_empty()
        {
            break s.trim().to_string();
        }
        if Instant::now() > deadline {
            bail!(
                "node {name} did not start; see {}",
                dir.join(format!("{name}.log")).display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let addr = status(&http)
        .and_then(|s| s.listen.into_iter().next())
        .unwrap_or_default();
    Ok(DemoNode {
        name: name.to_string(),
        site,
        child,
        http,
        addr,
    })
}

fn release(
    dir: &Path,
    key: &SigningKey,
    version: u64,
    model: &[u8],
    golden: &str,
    gate: bool,
) -> Result<(Manifest, PathBuf)> {
    let path = dir.join(format!("digits-v{version}.onnx"));
    std::fs::write(&path, model)?;
    let golden_path = dir.join(format!("golden-v{version}.json"));
    std::fs::write(&golden_path, golden)?;
    let now = pollen_keys::time::unix_now()?;
    let gate = gate.then_some(Gate {
        min_healthy: 1,
        max_failure_ppm: 0,
    });
    let spec = NewManifest {
        channel: Channel::new(CHANNEL).map_err(anyhow::Error::msg)?,
        version,
        files: vec![path.clone()],
        chunk_size: ChunkSize::new(16 * 1024)?,
        rollout: mf::parse_stages("40%,100%", Duration::from_secs(6), gate)?,
        created: now,
        expires: now.plus(Duration::from_secs(86400)),
        replaces: None,
    };
    let mut body = mf::build_body(&spec)?;
    body.golden = mf::golden_from_json(&golden_path)?;
    Ok((mf::sign(&body, &[key])?, path))
}

/// Publish through the node at `http` whose data directory is `data` (its API token).
fn publish(http: &str, data: &Path, m: &Manifest, file: &Path) -> Result<()> {
    let f = &m.body.artifact.variants[0].files[0];
    let client = client(http).with_token(pollen_node::client::find_token(
        Some(&data.join(pollen_node::http::auth::TOKEN_FILE)),
        None,
    ));
    let bytes = std::io::Cursor::new(std::fs::read(file)?);
    match client.put_file(&f.spec.content_id, f.spec.chunk_size.get(), bytes) {
        Err(ApiError::Refused { error, .. }) => bail!("upload refused: {error}"),
        r => r?,
    }
    match client.post_manifest(&m.signed.to_bytes()) {
        Err(ApiError::Refused { error, .. }) => bail!("manifest refused: {error}"),
        r => r.map(|_| ())?,
    }
    Ok(())
}

/// Build a release whose canary stage is gated on one healthy report, if any node falls
/// in it. Cohort points depend on the version, so each release is checked on its own: a
/// gate on an empty canary stage would wait forever. Returns the nodes in the canary.
fn gated_release(
    mesh: &DemoNodes,
    key: &SigningKey,
    version: u64,
    model: &[u8],
    golden: &str,
) -> Result<(Manifest, PathBuf, Vec<String>)> {
    let (probe, _) = release(mesh.dir.path(), key, version, model, golden, false)?;
    let canaries: Vec<String> = mesh
        .nodes
        .iter()
        .filter(|n| {
            status(&n.http)
                .and_then(|s| s.node_id.parse::<pollen_protocol::NodeId>().ok())
                .is_some_and(|id| probe.stage_of(&id) == Some(0))
        })
        .map(|n| n.name.clone())
        .collect();
    let (m, file) = release(
        mesh.dir.path(),
        key,
        version,
        model,
        golden,
        !canaries.is_empty(),
    )?;
    Ok((m, file, canaries))
}

fn gate_text(canaries: &[String]) -> String {
    if canaries.is_empty() {
        " (no node fell in the canary stage this time: no gate)".to_string()
    } else {
        format!(
            ", gated on one healthy report; canary nodes: {}",
            canaries.join(", ")
        )
    }
}

/// Print one line per node until every node serves `version`.
fn watch(mesh: &DemoNodes, version: u64, stop: &AtomicBool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        let mut line = String::new();
        let mut all = true;
        for n in &mesh.nodes {
            let s = status(&n.http);
            let (chunks, active, stages) = s
                .as_ref()
                .and_then(|s| s.channels.iter().find(|c| c.channel == CHANNEL))
                .map(|c| {
                    let r = c.releases.iter().find(|r| r.version == version);
                    let chunks = r.map_or("-".into(), |r| {
                        format!(
                            "{}/{}",
                            r.files.iter().map(|f| f.have).sum::<u32>(),
                            r.files.iter().map(|f| f.total).sum::<u32>()
                        )
                    });
                    let stages =
                        r.map_or("-".into(), |r| format!("{}/{}", r.open_stages, r.stages));
                    (chunks, c.active_version, stages)
                })
                .unwrap_or(("-".into(), None, "-".into()));
            all &= active == Some(version);
            line += &format!(
                "  {}({}) chunks {chunks:>5} stages {stages} serving {:<3}",
                n.name,
                n.site,
                active.map_or("-".into(), |v| format!("v{v}"))
            );
        }
        if line != last {
            println!("{line}");
            last = line;
        }
        if all {
            return Ok(());
        }
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!(
                "not every node serves v{version} after 2 minutes; logs are in {}",
                mesh.dir.path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn infer(http: &str, row: &serde_json::Value) -> Result<serde_json::Value> {
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
    Ok(client(http).infer(CHANNEL, &body)?)
}

fn show_answer(node: &DemoNode, v: &serde_json::Value, label: u64) {
    let probs: Vec<f64> = v["outputs"][0]["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    let (class, p) = probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, p)| (i, *p))
        .unwrap_or((0, 0.0));
    println!(
        "  {} answered with model_version {}: digit {class} (p = {p:.3}); the image is a {label}",
        node.name, v["model_version"]
    );
}

/// Run the demo.
pub fn run(out: &mut dyn Write) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::signal::ctrl_c().await;
                });
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let bin = std::env::current_exe().context("locating the pollen binary")?;
    let dir = tempfile::Builder::new().prefix("pollen-demo-").tempdir()?;
    writeln!(
        out,
        "== operator: a root key, a publisher key and a trust root in {}",
        dir.path().display()
    )?;
    let root = pollen_keys::generate_key()?;
    let publisher = pollen_keys::generate_key()?;
    let now = pollen_keys::time::unix_now()?;
    let mut trust_body = TrustRootBody::single_publisher(
        PublicKey::from(&root),
        PublicKey::from(&publisher),
        ChannelPattern(CHANNEL.into()),
        now,
        now.plus(Duration::from_secs(86400)),
    );
    trust_body.publishers[0].name = "demo".into();
    let trust = dir.path().join("trust.pollen");
    pollen_keys::files::write_signed(&trust, &Signed::sign(&trust_body, &[&root]))?;

    writeln!(
        out,
        "\n== five nodes on loopback: three in site 'north', two in site 'south'"
    )?;
    let mut mesh = DemoNodes {
        dir,
        nodes: Vec::new(),
    };
    let layout: [(&str, &'static str); 5] = [
        ("n1", "north"),
        ("n2", "north"),
        ("n3", "north"),
        ("s1", "south"),
        ("s2", "south"),
    ];
    for (name, site) in layout {
        let boot: Vec<String> = match mesh.nodes.first() {
            None => vec![],
            Some(first) => {
                let mut b = vec![first.addr.clone()];
                if let Some(same) = mesh
                    .nodes
                    .iter()
                    .find(|n| n.site == site && n.name != first.name)
                {
                    b.push(same.addr.clone());
                }
                b
            }
        };
        let n = start(&bin, mesh.dir.path(), name, site, &trust, &boot)?;
        writeln!(out, "  {name} ({site})  http://{}  {}", n.http, n.addr)?;
        mesh.nodes.push(n);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh
        .nodes
        .iter()
        .any(|n| status(&n.http).is_none_or(|s| s.peers.len() < 2))
    {
        if Instant::now() > deadline {
            bail!(
                "the nodes did not connect; logs are in {}",
                mesh.dir.path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let (m1, file1, canaries1) = gated_release(&mesh, &publisher, 1, MODEL_V1, GOLDEN_V1)?;
    writeln!(
        out,
        "\n== publish the bundled digits model v1 through n1: stages 40% then 100% six seconds later{}",
        gate_text(&canaries1)
    )?;
    publish(
        &mesh.nodes[0].http,
        &mesh.dir.path().join(&mesh.nodes[0].name),
        &m1,
        &file1,
    )?;
    watch(&mesh, 1, &stop)?;

    let golden: serde_json::Value = serde_json::from_str(GOLDEN_V1)?;
    let row = golden["inputs"][2].clone();
    let label = golden["labels"][2].as_u64().unwrap_or(0);
    writeln!(
        out,
        "\n== every node serves v1; a real inference request to s2"
    )?;
    show_answer(&mesh.nodes[4], &infer(&mesh.nodes[4].http, &row)?, label);

    let (m2, file2, canaries2) = gated_release(&mesh, &publisher, 2, MODEL_V2, GOLDEN_V2)?;
    writeln!(
        out,
        "\n== publish v2 (64 hidden units instead of 32) through s1 and watch the swap{}",
        gate_text(&canaries2)
    )?;
    publish(
        &mesh.nodes[3].http,
        &mesh.dir.path().join(&mesh.nodes[3].name),
        &m2,
        &file2,
    )?;
    watch(&mesh, 2, &stop)?;
    show_answer(&mesh.nodes[1], &infer(&mesh.nodes[1].http, &row)?, label);

    let n = &mesh.nodes[4];
    let sample = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
    let sample_path = mesh.dir.path().join("sample.json");
    std::fs::write(&sample_path, serde_json::to_vec(&sample)?)?;
    writeln!(out, "\n== try it:")?;
    writeln!(out, "  curl http://{}/v2/models/{CHANNEL}", n.http)?;
    writeln!(
        out,
        "  curl -X POST http://{}/v2/models/{CHANNEL}/infer -d @{}",
        n.http,
        sample_path.display()
    )?;
    writeln!(
        out,
        "  curl http://{}/v1/status    curl http://{}/metrics",
        n.http, n.http
    )?;
    writeln!(out, "  {} status --node http://{}", bin.display(), n.http)?;
    writeln!(
        out,
        "\n== a small language model (SmolLM2-135M from PyPI, converted, float and int8 \
         variants, chat on the OpenAI-compatible API): run scripts/slm-demo.sh"
    )?;
    if std::env::var_os("POLLEN_DEMO_EXIT").is_some() {
        return Ok(());
    }
    writeln!(
        out,
        "\nThe mesh keeps running; press Ctrl-C to stop it and clean up."
    )?;
    out.flush()?;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
