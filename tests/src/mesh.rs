//! Real `pollen run` processes on loopback (mDNS off), and the operator material they need.

use crate::pollen_bin;
use pollen_keys::manifest::{self as mf, NewManifest};
use pollen_node::client::{ApiError, NodeClient};
use pollen_node::status::Status;
use pollen_protocol::chunking::ChunkSize;
use pollen_protocol::manifest::{Channel, Manifest};
use pollen_protocol::rollout::RolloutPlan;
use pollen_protocol::trust::{ChannelPattern, TrustRootBody};
use pollen_protocol::{PublicKey, SigningKey, UnixTime};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Keys and a trust root in a directory.
#[derive(Debug)]
pub struct Operator {
    /// Where the files are.
    pub dir: PathBuf,
    /// Root key.
    pub root: SigningKey,
    /// Publisher key (allowed on every channel), written to `publisher.key`.
    pub publisher: SigningKey,
    /// Fleet key, if the trust root names one.
    pub fleet: Option<SigningKey>,
    /// `trust.pollen`.
    pub trust_file: PathBuf,
}

/// Wall-clock now.
pub fn now() -> UnixTime {
    pollen_keys::time::unix_now().expect("clock")
}

impl Operator {
    /// Generate keys and a trust root (with a fleet key if `fleet`), valid for 30 days.
    pub fn new(dir: &Path, fleet: bool) -> Self {
        Self::with_validity(dir, fleet, Duration::from_secs(86400 * 30))
    }

    /// Like [`Operator::new`], with a trust root that expires `validity` from now.
    pub fn with_validity(dir: &Path, fleet: bool, validity: Duration) -> Self {
        std::fs::create_dir_all(dir).expect("operator dir");
        let root = pollen_keys::generate_key().expect("key");
        let publisher = pollen_keys::generate_key().expect("key");
        pollen_keys::write_key_file(&dir.join("publisher.key"), &publisher).expect("write key");
        let fleet = fleet.then(|| pollen_keys::generate_key().expect("key"));
        let t = now();
        let body = TrustRootBody {
            fleet_key: fleet.as_ref().map(PublicKey::from),
            ..TrustRootBody::single_publisher(
                PublicKey::from(&root),
                PublicKey::from(&publisher),
                ChannelPattern("*".into()),
                t.minus(Duration::from_secs(60)),
                t.plus(validity),
            )
        };
        let signed = pollen_protocol::signing::Signed::sign(&body, &[&root]);
        let trust_file = dir.join("trust.pollen");
        pollen_keys::files::write_signed(&trust_file, &signed).expect("write trust root");
        Operator {
            dir: dir.to_path_buf(),
            root,
            publisher,
            fleet,
            trust_file,
        }
    }

    /// A certificate for a node id (hex), written to `<name>.cert`.
    pub fn certify(&self, node_hex: &str, name: &str) -> PathBuf {
        let fleet = self.fleet.as_ref().expect("fleet key");
        let node =
            pollen_protocol::NodeId(pollen_protocol::ids::parse_hex32(node_hex).expect("node id"));
        let cert = pollen_keys::cert::certify(
            fleet,
            node,
            name,
            now(),
            now().plus(Duration::from_secs(86400)),
        )
        .expect("certify");
        let path = self.dir.join(format!("{name}.cert"));
        pollen_keys::files::write_signed(&path, &cert).expect("write cert");
        path
    }

    /// Sign a manifest for `files` (1 MiB chunks unless `chunk`), immediate rollout.
    pub fn manifest(&self, files: &[PathBuf], channel: &str, version: u64, chunk: u64) -> Manifest {
        let t = now();
        let spec = NewManifest {
            channel: Channel::new(channel).expect("channel"),
            version,
            files: files.to_vec(),
            chunk_size: ChunkSize::new(chunk).expect("chunk size"),
            rollout: RolloutPlan::immediate(),
            created: t.minus(Duration::from_secs(5)),
            expires: t.plus(Duration::from_secs(86400)),
            replaces: None,
        };
        let body = mf::build_body(&spec).expect("manifest body");
        mf::sign(&body, &[&self.publisher]).expect("sign")
    }
}

impl Operator {
    /// `pollen publish` of a bundled model (`models/<model>`) on channel `digits` with the
    /// golden checks in `models/<golden>`, through `node`, signed with this operator's
    /// publisher key; `extra` flags (stages, gates) are appended. Panics if it fails.
    pub fn publish_digits(
        &self,
        tmp: &Path,
        node: &Node,
        model: &str,
        golden: &str,
        version: u64,
        extra: &[&str],
    ) {
        let models = crate::workspace_dir().join("models");
        let golden = models.join(golden).display().to_string();
        let mut flags = vec!["--golden", golden.as_str()];
        flags.extend(extra);
        self.publish(tmp, node, &models.join(model), "digits", version, &flags);
    }

    /// `pollen publish FILE` on `channel` through `node`, signed with this operator's
    /// publisher key; `extra` flags (golden checks, stages, gates) are appended. Panics if
    /// it fails.
    pub fn publish(
        &self,
        tmp: &Path,
        node: &Node,
        file: &Path,
        channel: &str,
        version: u64,
        extra: &[&str],
    ) {
        let mut args: Vec<String> = vec![
            "publish".into(),
            file.display().to_string(),
            "--channel".into(),
            channel.into(),
            "--version".into(),
            version.to_string(),
            "--key".into(),
            self.dir.join("publisher.key").display().to_string(),
            "--node".into(),
            node.url(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        crate::Pollen::in_dir(tmp).run(args).success();
    }

    /// Two nodes under this operator's trust root, `tmp/a` and `tmp/b` bootstrapped from
    /// it, returned once they are connected.
    pub fn connected_pair(&self, tmp: &Path) -> (Node, Node) {
        let trust = vec!["--trust".to_string(), self.trust_file.display().to_string()];
        let a = Node::start(&tmp.join("a"), &trust);
        let mut args = trust;
        args.extend(["--bootstrap".to_string(), a.addr()]);
        let b = Node::start(&tmp.join("b"), &args);
        b.wait(Duration::from_secs(20), "connected", |s| {
            !s.peers.is_empty()
        });
        (a, b)
    }

    /// An operator in `tmp/op` and one node in `tmp/n` under its trust root, serving v1 of
    /// the bundled digits model.
    pub fn with_node_serving_digits(tmp: &Path) -> (Operator, Node) {
        let op = Operator::new(&tmp.join("op"), false);
        let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
        let n = Node::start(&tmp.join("n"), &trust);
        op.publish_digits(tmp, &n, "digits-v1.onnx", "golden-v1.json", 1, &[]);
        n.wait(Duration::from_secs(60), "serving v1", |s| {
            s.channels.iter().any(|c| c.active_version == Some(1))
        });
        (op, n)
    }
}

/// Deterministic pseudo-random bytes (xorshift), for test files.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A running `pollen run` process. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Node {
    /// Its data directory.
    pub dir: PathBuf,
    /// Extra arguments it was started with.
    pub args: Vec<String>,
    child: Option<Child>,
    /// `127.0.0.1:PORT` of its HTTP API.
    pub http: String,
    /// Network namespace it runs in (None: the test's own).
    pub netns: Option<String>,
    /// libp2p listen address (default loopback TCP on an OS-chosen port).
    pub listen: String,
    /// Pass `--no-mdns`.
    pub no_mdns: bool,
    agent: ureq::Agent,
}

impl Node {
    /// Start `pollen run` with a fresh HTTP port and loopback TCP, mDNS off, plus `args`.
    pub fn start(dir: &Path, args: &[String]) -> Node {
        Self::start_in(None, "/ip4/127.0.0.1/tcp/0", true, dir, args)
    }

    /// Start inside network namespace `netns` (via `ip netns exec`), listening on
    /// `listen`, with mDNS on unless `no_mdns`. The HTTP API stays on the namespace's
    /// loopback; status is read with `pollen status` run inside the namespace.
    pub fn start_in(
        netns: Option<&str>,
        listen: &str,
        no_mdns: bool,
        dir: &Path,
        args: &[String],
    ) -> Node {
        let mut n = Node {
            dir: dir.to_path_buf(),
            args: args.to_vec(),
            child: None,
            netns: netns.map(String::from),
            listen: listen.to_string(),
            no_mdns,
            http: String::new(),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(30)))
                .http_status_as_error(false)
                .build()
                .into(),
        };
        n.restart();
        n
    }

    /// (Re)start the process with the same data dir and arguments.
    pub fn restart(&mut self) {
        self.kill();
        std::fs::create_dir_all(&self.dir).expect("data dir");
        // The node keeps a token it finds; every test node shares crate::TEST_TOKEN.
        let token = self.dir.join("api-token");
        if !token.exists() {
            std::fs::write(&token, crate::TEST_TOKEN).expect("api token");
        }
        let addr_file = self.dir.join("http.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .expect("log file");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(pollen_bin());
                c
            }
            None => Command::new(pollen_bin()),
        };
        cmd.arg("run").arg("--data-dir").arg(&self.dir).args([
            "--listen",
            &self.listen,
            "--http",
            "127.0.0.1:0",
        ]);
        if self.no_mdns {
            cmd.arg("--no-mdns");
        }
        let child = cmd
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("POLLEN_TEST_LOG").unwrap_or_else(|_| "info,libp2p_mdns=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn pollen run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file)
                && !s.is_empty()
            {
                self.http = s.trim().to_string();
                break;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("pollen run exited early ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "pollen run did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait(Duration::from_secs(30), "listening", |s| {
            !s.listen.is_empty()
        });
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// SIGKILL the process (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Is the process running?
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Base URL of the HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Status {
        self.try_status().expect("status request")
    }

    fn try_status(&self) -> Option<Status> {
        match &self.netns {
            None => self.client().try_status(),
            Some(ns) => {
                let out = Command::new("ip")
                    .args(["netns", "exec", ns])
                    .arg(pollen_bin())
                    .args(["status", "--json", "--node", &self.url()])
                    .output()
                    .ok()?;
                serde_json::from_slice(&out.stdout).ok()
            }
        }
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> String {
        let mut r = self
            .agent
            .get(format!("{}/metrics", self.url()))
            .call()
            .expect("metrics request");
        r.body_mut().read_to_string().expect("metrics text")
    }

    /// A metric's value (first line starting with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The first listen address, with `/p2p/<id>`.
    pub fn addr(&self) -> String {
        self.status()
            .listen
            .into_iter()
            .next()
            .expect("a listen address")
    }

    /// Poll the status until `pred` holds; panics with the log after `timeout`.
    pub fn wait(&self, timeout: Duration, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.try_status();
            if let Some(s) = &s
                && pred(s)
            {
                return s.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "node {} never reached '{what}' in {timeout:?}; status:\n{}\nlog tail:\n{}",
                    self.dir.display(),
                    s.map(|s| serde_json::to_string_pretty(&s).unwrap_or_default())
                        .unwrap_or_else(|| "unreachable".into()),
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Upload files and inject a manifest over the HTTP API; returns the HTTP status and
    /// body of the manifest post.
    pub fn publish(&self, m: &Manifest, files: &[PathBuf]) -> (u16, String) {
        self.upload(m, files);
        self.post_manifest(&m.signed.to_bytes())
    }

    /// Upload the files of a manifest (`PUT /v1/files/...`), panicking on refusal.
    pub fn upload(&self, m: &Manifest, files: &[PathBuf]) {
        for (path, f) in files.iter().zip(&m.body.artifact.variants[0].files) {
            let file = std::fs::File::open(path).expect("open file");
            match self
                .client()
                .put_file(&f.spec.content_id, f.spec.chunk_size.get(), file)
            {
                Ok(()) => {}
                Err(ApiError::Transport(e)) => panic!("upload: {e}"),
                Err(e) => panic!("upload refused: {e}"),
            }
        }
    }

    /// A client of the node's API (the test's own namespace only), with its token.
    pub fn client(&self) -> NodeClient {
        NodeClient::new(&self.url(), Duration::from_secs(30))
            .with_token(Some(crate::TEST_TOKEN.into()))
    }

    /// `POST /v1/manifests` with raw bytes.
    pub fn post_manifest(&self, bytes: &[u8]) -> (u16, String) {
        self.http("POST", "/v1/manifests", bytes)
    }

    /// An HTTP request to the node's API (`GET`, `POST`, `PUT` or `DELETE`) with the
    /// node's API token; returns the status and body.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let bearer = format!("Bearer {}", crate::TEST_TOKEN);
        self.http_with(method, path, body, &[("authorization", &bearer)])
    }

    /// [`Node::http`] with exactly these headers (no token unless given).
    pub fn http_with(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let url = format!("{}{path}", self.url());
        macro_rules! with_headers {
            ($req:expr) => {{
                let mut r = $req;
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r
            }};
        }
        let r = match method {
            "GET" => with_headers!(self.agent.get(&url)).call(),
            "DELETE" => with_headers!(self.agent.delete(&url)).call(),
            "PUT" => with_headers!(self.agent.put(&url)).send(body),
            "POST" => with_headers!(self.agent.post(&url)).send(body),
            other => panic!("unsupported method {other}"),
        };
        let mut r = r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap_or_default())
    }

    /// Does the node hold every chunk of `channel`'s release `version`?
    pub fn has_release(s: &Status, channel: &str, version: u64) -> bool {
        s.channels.iter().any(|c| {
            c.channel == channel
                && c.releases.iter().any(|r| {
                    r.version == version && r.files.iter().all(|f| f.have == f.total && f.total > 0)
                })
        })
    }

    /// Path of a blob in the node's store.
    pub fn blob(&self, content_id: &str) -> PathBuf {
        self.dir.join("blobs").join(content_id)
    }

    /// The bytes of a blob, once it is there: a file whose chunks are all durable is
    /// renamed into `blobs/` right after, not in the same step. Panics after `timeout`.
    pub fn wait_blob(&self, content_id: &str, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(b) = std::fs::read(self.blob(content_id)) {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "blob {content_id} never appeared in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
