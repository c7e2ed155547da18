//! Node configuration: a TOML file whose every option is documented here, overridden by
//! command-line flags. The defaults start a working node on a laptop with no file at all.
//!
//! ```toml
//! # Where the identity key, the store and the node state live.
//! data_dir = "/var/lib/pollen"
//! # libp2p listen addresses (OS-chosen ports by default).
//! listen = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
//! # Addresses under which others reach this node, when it knows them (public IP, port
//! # forward). A relay server also announces the addresses it listens on.
//! external = []
//! # Peers to dial at start and to seed Kademlia (multiaddrs ending in /p2p/<peer id>).
//! bootstrap = []
//! # The local HTTP API (status, metrics, publishing, inference). Loopback only unless
//! # `http_public = true`.
//! http = "127.0.0.1:7411"
//! http_public = false
//! # Every mutation (uploads, manifests, instructions, pins) needs the bearer token the
//! # node keeps in <data_dir>/api-token. Host names accepted besides loopback ones, and
//! # browser origins allowed to call the API (none by default):
//! http_allowed_hosts = []
//! http_allowed_origins = []
//! # With http_public, every route needs the token, unless this opens inference (/v2).
//! http_public_inference = false
//! # This node's site (LAN) name; peers on the same site are preferred for chunks.
//! site = "default"
//! # Trust root file to install (operator-provided; later rotations arrive by gossip).
//! trust = "/etc/pollen/trust.pollen"
//! # This node's certificate, when the trust root names a fleet key.
//! cert = "/etc/pollen/node.cert"
//! # LAN discovery by multicast DNS.
//! mdns = true
//! # Serve as a circuit relay for nodes behind NAT, and the bytes one relayed connection
//! # may carry (0 = unlimited).
//! relay_server = false
//! relay_circuit_bytes = 1073741824
//! # Listen through these relays (multiaddrs of relay nodes ending in /p2p/<id>) so that
//! # this node is reachable behind NAT.
//! relays = []
//! # Bandwidth limits in bytes per second (0 = unlimited).
//! upload_limit = 0
//! download_limit = 0
//! # Chunk uploads in progress at once, across all peers.
//! max_concurrent_uploads = 16
//! # Chunk uploads kept waiting for one of them; a request past them is answered Busy
//! # (the peer asks another holder).
//! queued_uploads = 2
//! # Connections: established in total, and per peer.
//! max_connections = 256
//! max_connections_per_peer = 2
//! # Peers to keep connected to (discovery dials more while below this).
//! target_peers = 16
//! # Inference: the node's own inference threads (0 = one per CPU), and requests admitted
//! # beyond them (receiving their body or waiting for a thread); past that the API answers
//! # 503 at once, before reading the body.
//! inference_threads = 0
//! inference_queue = 64
//! # Language models: generations at once (each runs on a thread of its own), and
//! # requests waiting for one; past that the OpenAI API answers 429.
//! max_generations = 2
//! generation_queue = 8
//! # Threads one generation's matrix products share (0 = one per CPU).
//! generation_threads = 0
//! # Device class for choosing a model variant (e.g. "weak-cpu").
//! device_class = "default"
//! # Health reports: how often a serving node reports its requests, errors and latency
//! # (it also reports at once on activation, failure and rollback).
//! health_interval = "30s"
//! # Panics of the model runtime within one health window that make a crash loop.
//! crash_loop_panics = 3
//! # Memory a model may take while it is tried and loaded, in bytes (0: half of the
//! # machine's memory). A model over it fails its activation; the node keeps serving.
//! model_memory_budget = 0
//! # How long a model's trial run (load, optimise, warm up, golden checks) may take.
//! activation_timeout = "10m"
//! # A model whose symbolic dimensions tract cannot optimise with is prepared per input
//! # shape; this many prepared shapes are kept per model (least recently used out; never
//! # more copies than the model memory budget holds). A request waits at most 10 s for
//! # its shape's preparation, then gets 503 and a reason.
//! model_specialisations = 8
//! # Bytes of uploaded files no retained release refers to yet (uploads waiting for
//! # their manifest) the node keeps at most; an upload past it is refused with 507.
//! max_unreferenced_bytes = 4294967296
//! # Seed for the protocol core's RNG (random from the OS when absent).
//! seed = 42
//! # Local pins: channel = version. A pinned channel serves that version whatever the
//! # rollouts say (an edge site that must not change during its working hours); give
//! # every node of a site the same pins to pin the site. `pollen pin` sets them at run
//! # time too; pins in this file win at start.
//! [pins]
//! "vision.defects" = 3
//! ```

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default HTTP address.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7411";

/// Everything `pollen run` needs. See the module doc for the file format.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// libp2p listen addresses.
    pub listen: Vec<String>,
    /// Bootstrap peers.
    pub bootstrap: Vec<String>,
    /// Externally reachable addresses to announce.
    pub external: Vec<String>,
    /// HTTP API address.
    pub http: SocketAddr,
    /// Allow a non-loopback HTTP address.
    pub http_public: bool,
    /// Host names accepted besides loopback ones.
    pub http_allowed_hosts: Vec<String>,
    /// Browser origins allowed to call the API.
    pub http_allowed_origins: Vec<String>,
    /// With `http_public`: inference without the token.
    pub http_public_inference: bool,
    /// Site name.
    pub site: Option<String>,
    /// Trust root file.
    pub trust: Option<PathBuf>,
    /// Node certificate file.
    pub cert: Option<PathBuf>,
    /// mDNS discovery.
    pub mdns: bool,
    /// Act as a relay server.
    pub relay_server: bool,
    /// Bytes one relayed connection may carry (0 = unlimited).
    pub relay_circuit_bytes: u64,
    /// Relays to listen through.
    pub relays: Vec<String>,
    /// Upload limit, bytes/s (0 = none).
    pub upload_limit: u64,
    /// Download limit, bytes/s (0 = none).
    pub download_limit: u64,
    /// Concurrent chunk uploads.
    pub max_concurrent_uploads: usize,
    /// Chunk uploads kept waiting for a slot (or behind the upload on its way to the same
    /// peer) while every slot is taken; a request past them is answered `Busy`, and the
    /// peer asks another holder (`pollen_protocol::QUEUED_UPLOADS`). 0: `Busy` whenever
    /// every slot is taken.
    pub queued_uploads: usize,
    /// Established connections in total.
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
    /// Peers to dial from what the WAN discovery finds (Kademlia, the bootstrap). Every
    /// peer mDNS finds on the LAN is dialled whatever this says, within
    /// `max_connections`.
    pub target_peers: usize,
    /// Inference threads, the node's own (0: one per CPU): at most this many inferences
    /// run at once.
    pub inference_threads: usize,
    /// Inference requests admitted beyond `inference_threads`, receiving their body or
    /// waiting for a thread; past that, 503 before the body is read.
    pub inference_queue: usize,
    /// Language-model generations at once (at least 1).
    pub max_generations: usize,
    /// Generation requests waiting for a place; past that, 429.
    pub generation_queue: usize,
    /// Threads one generation's matrix products share (0: one per CPU).
    pub generation_threads: usize,
    /// Device class.
    pub device_class: Option<String>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Health report interval (a duration such as "30s").
    pub health_interval: String,
    /// Runtime panics in one window that count as a crash loop.
    pub crash_loop_panics: u64,
    /// Bytes a model may take while it is tried and loaded (0: half of the machine's
    /// memory, see [`NodeConfig::model_memory_budget`]).
    pub model_memory_budget: u64,
    /// Longest trial run of a model (a duration such as "10m").
    pub activation_timeout: String,
    /// Prepared input shapes kept per model that is prepared per shape (at least 1).
    pub model_specialisations: usize,
    /// Upload quota: bytes of stored files that no retained release refers to (files
    /// uploaded for a manifest not published yet). Unreferenced files are collected
    /// after a grace period; until then an upload that would pass the quota gets 507.
    pub max_unreferenced_bytes: u64,
    /// Local version pins per channel.
    pub pins: std::collections::BTreeMap<String, u64>,
    /// Test only: serve corrupt chunks (flips a byte of each chunk sent).
    #[serde(skip)]
    pub test_corrupt_chunks: bool,
    /// Test only: every frame after a peer's Hello must be whole this long after its first
    /// byte, whatever its length (instead of the deadlines of [`crate::net::ReadDeadlines`]).
    #[serde(skip)]
    pub test_frame_deadline: Option<std::time::Duration>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: default_data_dir(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".into(),
                "/ip4/0.0.0.0/udp/0/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            external: Vec::new(),
            http: DEFAULT_HTTP.parse().expect("valid default address"),
            http_public: false,
            http_allowed_hosts: Vec::new(),
            http_allowed_origins: Vec::new(),
            http_public_inference: false,
            site: None,
            trust: None,
            cert: None,
            mdns: true,
            relay_server: false,
            relay_circuit_bytes: 1 << 30,
            relays: Vec::new(),
            upload_limit: 0,
            download_limit: 0,
            max_concurrent_uploads: 16,
            queued_uploads: pollen_protocol::QUEUED_UPLOADS,
            max_connections: 256,
            max_connections_per_peer: 2,
            target_peers: 16,
            inference_threads: 0,
            inference_queue: 64,
            max_generations: 2,
            generation_queue: 8,
            generation_threads: 0,
            device_class: None,
            seed: None,
            health_interval: "30s".into(),
            crash_loop_panics: 3,
            model_memory_budget: 0,
            activation_timeout: "10m".into(),
            model_specialisations: crate::serving::model::DEFAULT_SPECIALISATIONS,
            max_unreferenced_bytes: 4 << 30,
            pins: std::collections::BTreeMap::new(),
            test_corrupt_chunks: false,
            test_frame_deadline: None,
        }
    }
}

/// `$XDG_DATA_HOME/pollen`, else `~/.local/share/pollen`, else `./pollen-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("pollen");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/pollen");
    }
    PathBuf::from("pollen-data")
}

impl NodeConfig {
    /// Read a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Check the combination of options.
    pub fn validate(&self) -> Result<()> {
        if !self.http.ip().is_loopback() && !self.http_public {
            bail!(
                "the HTTP API would listen on {}, which is not loopback; set http_public = true (or --http-public) to allow it",
                self.http
            );
        }
        if let Some(site) = &self.site
            && (site.is_empty() || site.len() > 64)
        {
            bail!("site name must be 1 to 64 bytes");
        }
        if self.max_concurrent_uploads == 0 {
            bail!("max_concurrent_uploads must be at least 1");
        }
        let h = self.health_interval()?;
        if h < std::time::Duration::from_millis(100) || h > std::time::Duration::from_secs(3600) {
            bail!("health_interval must be from 100ms to 1h");
        }
        if self.crash_loop_panics == 0 {
            bail!("crash_loop_panics must be at least 1");
        }
        self.activation_timeout()?;
        if self.model_specialisations == 0 || self.model_specialisations > 1024 {
            bail!("model_specialisations must be from 1 to 1024");
        }
        for (c, v) in &self.pins {
            pollen_protocol::manifest::Channel::new(c)
                .map_err(|e| anyhow::anyhow!("pins: channel {c:?}: {e}"))?;
            if *v == 0 {
                bail!("pins: {c} = 0: versions start at 1");
            }
        }
        Ok(())
    }

    /// The model memory budget in bytes: the configured one, else half of the machine's
    /// memory (`MemTotal` in `/proc/meminfo`), else 4 GiB.
    pub fn model_memory_budget(&self) -> u64 {
        if self.model_memory_budget > 0 {
            return self.model_memory_budget;
        }
        let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
        total_kib.map_or(4 << 30, |k| k * 1024 / 2)
    }

    /// Threads one generation's matrix products share: `generation_threads`, or one per
    /// CPU when 0.
    pub fn lm_threads(&self) -> usize {
        match self.generation_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// How models are served here: the memory budget and the per-shape cache bound.
    pub fn serving_limits(&self) -> crate::serving::ServingLimits {
        crate::serving::ServingLimits {
            specialisations: self.model_specialisations.max(1),
            ..crate::serving::ServingLimits::new(self.model_memory_budget())
        }
    }

    /// The longest trial run of a model.
    pub fn activation_timeout(&self) -> Result<std::time::Duration> {
        pollen_keys::time::parse_duration(&self.activation_timeout)
            .with_context(|| format!("activation_timeout {:?}", self.activation_timeout))
    }

    /// The health report interval.
    pub fn health_interval(&self) -> Result<std::time::Duration> {
        pollen_keys::time::parse_duration(&self.health_interval)
            .with_context(|| format!("health_interval {:?}", self.health_interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_file() {
        let c = NodeConfig::default();
        c.validate().unwrap();
        assert!(c.http.ip().is_loopback());
        let parsed: NodeConfig =
            toml::from_str("site = \"a\"\nmdns = false\nupload_limit = 1000\n").unwrap();
        assert_eq!(parsed.site.as_deref(), Some("a"));
        assert!(!parsed.mdns);
        assert!(
            toml::from_str::<NodeConfig>("nope = 1").is_err(),
            "unknown keys are errors"
        );
        let public: NodeConfig = toml::from_str("http = \"0.0.0.0:80\"").unwrap();
        assert!(public.validate().is_err());
    }

    #[test]
    fn module_doc_example_parses() {
        let doc = include_str!("config.rs");
        let toml_text: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n");
        let c: NodeConfig = toml::from_str(&toml_text).unwrap();
        assert_eq!(c.seed, Some(42));
        assert_eq!(c.pins.get("vision.defects"), Some(&3));
        assert_eq!(
            c.health_interval().unwrap(),
            std::time::Duration::from_secs(30)
        );
        c.validate().unwrap();
    }
}
