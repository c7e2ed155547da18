//! The multi-site test bed: real `pollen run` processes in network namespaces, sites joined
//! by WAN links with shaped bandwidth, latency, jitter and loss.
//!
//! ```text
//!  node ns (eth0 10.77.S.10+j) ──veth── site ns S: bridge br0 10.77.S.1, `wan` 10.78.S.2
//!                                            │ (tbf: the site's WAN uplink)
//!                                            │
//!                          router ns R: `sS` 10.78.S.1 (tbf: the site's WAN downlink)
//!                                 every packet from a site ─▶ TUN `dl` ─▶ pollen-delayline
//!                                 (latency, jitter, loss) ─▶ back into R ─▶ destination site
//! ```
//!
//! A site's nodes share a bridge (mDNS works among them, as on a LAN); a site reaches the
//! others only through its uplink veth to the router namespace, whose two directions are
//! shaped with `tbf` at the site's WAN rates. This kernel has no `netem`, so latency,
//! jitter and loss between sites come from `pollen-delayline` (see that binary), which the
//! router's policy routing sends every inter-site packet through. A site may sit behind a
//! NAT (its uplink masquerades; nothing outside can dial in). Per-node upload and download
//! rates are `tbf` on each node's veth. Byte counters are the router's interface counters
//! (what crossed each site's WAN link, every header included).
//!
//! Namespaces are named `pbed<pid>-…`: a bed deletes its own on drop, and a new bed deletes
//! those of beds whose process is gone (a killed test), never any other namespace.
//! [`Bed::new`] returns `None`, with a message, where namespaces cannot be made.

use crate::mesh::{Node, Operator};
use pollen_node::status::Status;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One site of the bed.
#[derive(Clone, Debug)]
pub struct Site {
    /// Name, given to its nodes' `--site`.
    pub name: String,
    /// Nodes in it.
    pub nodes: usize,
    /// One-way latency from the site to the WAN core (two sites: the sum of theirs).
    pub wan_latency: Duration,
    /// Uniform jitter added to that latency (± this), never reordering packets.
    pub wan_jitter: Duration,
    /// Packet loss on the site's WAN link (each direction).
    pub wan_loss: f64,
    /// WAN uplink, bytes/s.
    pub wan_up: f64,
    /// WAN downlink, bytes/s.
    pub wan_down: f64,
    /// Each node's upload, bytes/s (`None`: unshaped veth).
    pub node_up: Option<f64>,
    /// Each node's download, bytes/s (`None`: unshaped).
    pub node_down: Option<f64>,
    /// Behind a NAT: its nodes can dial out, nothing can dial in.
    pub nat: bool,
}

impl Site {
    /// A site of `nodes` nodes with a symmetric WAN link of `mbit` Mbit/s, `latency` away
    /// from the core, no loss, unshaped nodes.
    pub fn new(name: &str, nodes: usize, mbit: f64, latency: Duration) -> Site {
        Site {
            name: name.into(),
            nodes,
            wan_latency: latency,
            wan_jitter: Duration::ZERO,
            wan_loss: 0.0,
            wan_up: mbit * 1e6 / 8.0,
            wan_down: mbit * 1e6 / 8.0,
            node_up: None,
            node_down: None,
            nat: false,
        }
    }
}

/// The bed: namespaces, links and the delay line. Everything is removed on drop.
#[derive(Debug)]
pub struct Bed {
    /// Namespace name prefix (`pbed<pid>-<n>`).
    pub tag: String,
    /// Sites, in order (site `i` has LAN 10.77.i.0/24).
    pub sites: Vec<Site>,
    namespaces: Vec<String>,
    delayline: Option<Child>,
    /// Where the delay line writes its counters.
    pub stats_file: PathBuf,
}

/// Why a command of the bed failed.
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("bed: {e}");
    }
}

/// The `pollen-delayline` binary next to the test binaries (built with this crate).
pub fn delayline_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("POLLEN_DELAYLINE") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_pollen-delayline") {
        return PathBuf::from(p);
    }
    // Binaries of this package sit next to the test executable's `deps/` directory.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join("pollen-delayline");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "pollen-delayline not found next to {} (build it: cargo build -p pollen-tests --bin pollen-delayline, or set POLLEN_DELAYLINE)",
        exe.display()
    );
}

static BEDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Delete namespaces left by beds whose process is gone (a test killed before its drop).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("pbed") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

/// Give `dev` in namespace `ns` the address `cidr`.
fn addr(ns: &str, cidr: &str, dev: &str) {
    must(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
}

/// tbf on `dev` in `ns` at `rate` bytes/s: a burst of 5 ms of the rate (at least two
/// full frames) and a queue of at most 50 ms of it.
fn shape(ns: &str, dev: &str, rate: f64) {
    let bits = format!("{}bit", (rate * 8.0).round() as u64);
    let burst = format!("{}", ((rate * 0.005) as u64).max(3100));
    must(&[
        "tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &bits, "burst",
        &burst, "latency", "50ms",
    ]);
}

impl Bed {
    /// Build the bed's namespaces and links; `None` (skip, with a message) where network
    /// namespaces cannot be created here. Panics if a later step fails (a broken bed is a
    /// failed test, not a skip).
    pub fn new(sites: Vec<Site>, seed: u64) -> Option<Bed> {
        assert!(!sites.is_empty() && sites.len() <= 200, "1..=200 sites");
        assert!(
            sites.iter().all(|s| s.nodes <= 240),
            "at most 240 nodes a site"
        );
        sweep_stale();
        let tag = format!(
            "pbed{}-{}",
            std::process::id(),
            BEDS.fetch_add(1, Ordering::Relaxed)
        );
        let mut bed = Bed {
            stats_file: std::env::temp_dir().join(format!("{tag}-delayline.json")),
            tag,
            sites,
            namespaces: vec![],
            delayline: None,
        };
        let router = bed.router();
        if let Err(e) = run(&["ip", "netns", "add", &router]) {
            eprintln!("SKIP: cannot create network namespaces ({e})");
            return None;
        }
        bed.namespaces.push(router.clone());
        bed.build(seed);
        Some(bed)
    }

    fn add_ns(&mut self, name: &str) {
        must(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_string());
        must(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    fn build(&mut self, seed: u64) {
        let r = self.router();
        must(&["ip", "-n", &r, "link", "set", "lo", "up"]);
        for k in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            must(&["ip", "netns", "exec", &r, "sysctl", "-qw", k]);
        }
        // The delay line owns the TUN device `dl` in the router namespace.
        let mut dl = Command::new("ip");
        dl.args(["netns", "exec", &r])
            .arg(delayline_bin())
            .args(["--dev", "dl", "--seed", &seed.to_string(), "--stats"])
            .arg(&self.stats_file);
        for (i, s) in self.sites.iter().enumerate() {
            dl.arg("--site").arg(format!(
                "{i},{},{},{}",
                s.wan_latency.as_micros(),
                s.wan_jitter.as_micros(),
                s.wan_loss
            ));
        }
        let child = dl
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn pollen-delayline");
        self.delayline = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while run(&["ip", "-n", &r, "link", "show", "dl"]).is_err() {
            if let Some(c) = self.delayline.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("pollen-delayline exited ({st})");
            }
            assert!(
                Instant::now() < deadline,
                "the delay line's device never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        must(&["ip", "-n", &r, "link", "set", "dl", "up"]);
        must(&[
            "ip",
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.conf.dl.rp_filter=0",
        ]);
        must(&[
            "ip", "-n", &r, "route", "add", "default", "dev", "dl", "table", "100",
        ]);
        for i in 0..self.sites.len() {
            self.build_site(i);
        }
    }

    fn build_site(&mut self, i: usize) {
        let s = self.sites[i].clone();
        let (r, sn) = (self.router(), self.site_ns(i));
        self.add_ns(&sn);
        let rdev = format!("s{i}");
        must(&[
            "ip", "-n", &sn, "link", "add", "name", "wan", "type", "veth", "peer", "name", &rdev,
            "netns", &r,
        ]);
        addr(&sn, &format!("10.78.{i}.2/30"), "wan");
        must(&["ip", "-n", &sn, "link", "set", "wan", "up"]);
        addr(&r, &format!("10.78.{i}.1/30"), &rdev);
        must(&["ip", "-n", &r, "link", "set", &rdev, "up"]);
        shape(&sn, "wan", s.wan_up);
        shape(&r, &rdev, s.wan_down);
        // Everything a site sends to the router goes through the delay line first; what
        // comes back out of it is routed by the main table.
        must(&["ip", "-n", &r, "rule", "add", "iif", &rdev, "lookup", "100"]);
        if !s.nat {
            must(&[
                "ip",
                "-n",
                &r,
                "route",
                "add",
                &format!("10.77.{i}.0/24"),
                "via",
                &format!("10.78.{i}.2"),
            ]);
        }
        must(&[
            "ip",
            "netns",
            "exec",
            &sn,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        must(&["ip", "-n", &sn, "link", "add", "br0", "type", "bridge"]);
        addr(&sn, &format!("10.77.{i}.1/24"), "br0");
        must(&["ip", "-n", &sn, "link", "set", "br0", "up"]);
        must(&[
            "ip",
            "-n",
            &sn,
            "route",
            "add",
            "default",
            "via",
            &format!("10.78.{i}.1"),
        ]);
        if s.nat {
            must(&[
                "ip",
                "netns",
                "exec",
                &sn,
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ]);
        }
        for j in 0..s.nodes {
            let nn = self.node_ns(i, j);
            self.add_ns(&nn);
            let port = format!("n{j}");
            must(&[
                "ip", "-n", &nn, "link", "add", "name", "eth0", "type", "veth", "peer", "name",
                &port, "netns", &sn,
            ]);
            must(&["ip", "-n", &sn, "link", "set", &port, "master", "br0"]);
            must(&["ip", "-n", &sn, "link", "set", &port, "up"]);
            addr(&nn, &format!("{}/24", self.node_ip(i, j)), "eth0");
            must(&["ip", "-n", &nn, "link", "set", "eth0", "up"]);
            must(&[
                "ip",
                "-n",
                &nn,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{i}.1"),
            ]);
            if let Some(up) = s.node_up {
                shape(&nn, "eth0", up);
            }
            if let Some(down) = s.node_down {
                shape(&sn, &port, down);
            }
        }
    }

    /// The router namespace.
    pub fn router(&self) -> String {
        format!("{}-r", self.tag)
    }

    /// Site `i`'s namespace (its bridge and uplink).
    pub fn site_ns(&self, i: usize) -> String {
        format!("{}-s{i}", self.tag)
    }

    /// Node `j` of site `i`'s namespace.
    pub fn node_ns(&self, i: usize, j: usize) -> String {
        format!("{}-n{i}-{j}", self.tag)
    }

    /// Node `j` of site `i`'s address.
    pub fn node_ip(&self, i: usize, j: usize) -> String {
        format!("10.77.{i}.{}", 10 + j)
    }

    /// Shape one node's upload (e.g. a publisher with its own uplink), bytes/s.
    pub fn shape_node_up(&self, i: usize, j: usize, rate: f64) {
        shape(&self.node_ns(i, j), "eth0", rate);
    }

    /// Bytes that crossed site `i`'s WAN link: (into the site, out of it). The router's
    /// end of the link sends what goes into the site.
    pub fn wan_bytes(&self, i: usize) -> (u64, u64) {
        let (rx, tx) = link_bytes(&self.router(), &format!("s{i}"));
        (tx, rx)
    }

    /// Bytes through node `j` of site `i`'s network interface: (received, sent).
    pub fn node_bytes(&self, i: usize, j: usize) -> (u64, u64) {
        link_bytes(&self.node_ns(i, j), "eth0")
    }

    /// Drop (`blocked = true`) or pass again what site `i` sends to node `j` of site `k`
    /// directly (after the site's NAT, if any): a firewall between them. Replies to
    /// connections the node opens are blocked too (they come from the same address).
    pub fn block(&self, i: usize, k: usize, j: usize, blocked: bool) {
        let op = if blocked { "-I" } else { "-D" };
        let src = format!("10.78.{i}.2");
        let dst = self.node_ip(k, j);
        for (s, d) in [(&src, &dst), (&dst, &src)] {
            must(&[
                "ip",
                "netns",
                "exec",
                &self.router(),
                "iptables",
                op,
                "FORWARD",
                "-s",
                s,
                "-d",
                d,
                "-j",
                "DROP",
            ]);
        }
    }

    /// Set a network sysctl (e.g. `net.ipv4.tcp_retries2`) in every node's namespace
    /// (they are per namespace).
    pub fn node_sysctl(&self, key: &str, value: &str) {
        for (i, site) in self.sites.iter().enumerate() {
            for j in 0..site.nodes {
                must(&[
                    "ip",
                    "netns",
                    "exec",
                    &self.node_ns(i, j),
                    "sysctl",
                    "-qw",
                    &format!("{key}={value}"),
                ]);
            }
        }
    }

    /// The delay line's counters (`forwarded`, `lost`, `overflow`, …), as last written.
    pub fn delayline_stats(&self) -> serde_json::Value {
        std::fs::read(&self.stats_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Cut site `i`'s WAN link (`up = false`: every packet in or out is dropped) or
    /// restore it.
    pub fn set_wan(&self, i: usize, up: bool) {
        let r = self.router();
        let dev = format!("s{i}");
        for dir in ["-i", "-o"] {
            let op = if up { "-D" } else { "-I" };
            must(&[
                "ip", "netns", "exec", &r, "iptables", op, "FORWARD", dir, &dev, "-j", "DROP",
            ]);
        }
        // Packets from the site go to the delay line (not FORWARD): drop them at its door.
        let op = if up { "-D" } else { "-I" };
        must(&[
            "ip",
            "netns",
            "exec",
            &r,
            "iptables",
            "-t",
            "raw",
            op,
            "PREROUTING",
            "-i",
            &dev,
            "-j",
            "DROP",
        ]);
    }

    /// Start `pollen run` on every node: site names as `--site`, `args` for all (trust
    /// root, …), every node but the first of site `seed_site` bootstrapped from that one.
    /// Where a site is behind NAT, that first node is a relay and nothing else (started
    /// with `--relay-server` and without `args`: it holds no model), and the NAT'd sites'
    /// nodes listen through it. Data directories under `dir/<site>-<j>`. Returns the nodes
    /// per site.
    pub fn start_nodes(&self, dir: &Path, seed_site: usize, args: &[String]) -> Vec<Vec<Node>> {
        let mut out: Vec<Vec<Node>> = self.sites.iter().map(|_| vec![]).collect();
        let start = |i: usize, j: usize, common: &[String], extra: &[String]| {
            let mut a = common.to_vec();
            a.extend(["--site".to_string(), self.sites[i].name.clone()]);
            a.extend(extra.iter().cloned());
            Node::start_in(
                Some(&self.node_ns(i, j)),
                &format!("/ip4/{}/tcp/4001", self.node_ip(i, j)),
                false,
                &dir.join(format!("{}-{j}", self.sites[i].name)),
                &a,
            )
        };
        let relay = self.sites.iter().any(|s| s.nat);
        let first = if relay {
            start(seed_site, 0, &[], &["--relay-server".to_string()])
        } else {
            start(seed_site, 0, args, &[])
        };
        let boot = vec!["--bootstrap".to_string(), first.addr()];
        out[seed_site].push(first);
        // Start the rest in parallel: each start waits for its node to listen.
        let started: Vec<(usize, Node)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..self.sites.len())
                .flat_map(|i| (0..self.sites[i].nodes).map(move |j| (i, j)))
                .filter(|&(i, j)| !(i == seed_site && j == 0))
                .map(|(i, j)| {
                    let mut extra = boot.clone();
                    if self.sites[i].nat {
                        extra.extend(["--relay".to_string(), boot[1].clone()]);
                    }
                    let start = &start;
                    sc.spawn(move || (i, start(i, j, args, &extra)))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("node start"))
                .collect()
        });
        for (i, n) in started {
            out[i].push(n);
        }
        out
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut c) = self.delayline.take() {
            // SIGTERM through `kill`: the child is `ip netns exec`, which exec'd the line.
            let _ = Command::new("kill").arg(c.id().to_string()).output();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", n]);
        }
        let _ = std::fs::remove_file(&self.stats_file);
    }
}

/// Bytes device `dev` in namespace `ns` has counted: (received, sent).
fn link_bytes(ns: &str, dev: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .expect("ip link show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let st = &v[0]["stats64"];
    (
        st["rx"]["bytes"].as_u64().unwrap_or(0),
        st["tx"]["bytes"].as_u64().unwrap_or(0),
    )
}

/// Run `f` on a thread inside network namespace `ns` (a thread's namespace is its own:
/// the caller's is untouched). Used to reach a node's HTTP API on its loopback.
#[allow(unsafe_code)]
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a valid namespace fd; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace")
    })
}

/// Pins the calling thread to the CPU it is running on.
///
/// Why: a packet a thread sends into a veth or writes into a TUN device is queued on the
/// current CPU's backlog, so a thread that moves between CPUs between two packets can
/// have them delivered out of order. The delay line and the tests that count reordering
/// pin their packet-writing thread; nodes are left to the scheduler, as on a real host.
#[allow(unsafe_code)]
pub fn pin_to_current_cpu() -> std::io::Result<()> {
    // SAFETY: sched_getcpu takes no arguments; a negative result is an error.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it, and
    // sched_setaffinity(0, ...) reads it for the calling thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Completion times of one release on a set of nodes, polled from their status every
/// 100 ms from when the watch starts.
#[derive(Debug)]
pub struct Watch {
    /// When the watch started.
    pub start: Instant,
    done: Arc<Mutex<Vec<Option<Duration>>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Watch `nodes` (namespace, HTTP address) until each holds every chunk of `channel`
    /// version `version`.
    pub fn new(nodes: &[&Node], channel: &str, version: u64) -> Watch {
        let start = Instant::now();
        let done = Arc::new(Mutex::new(vec![None; nodes.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = nodes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let ns = n.netns.clone().expect("a bed node");
                let client = n.client();
                let (done, stop, channel) = (done.clone(), stop.clone(), channel.to_string());
                std::thread::spawn(move || {
                    in_netns(&ns, || {
                        while !stop.load(Ordering::Relaxed) {
                            if let Some(s) = client.try_status()
                                && Node::has_release(&s, &channel, version)
                            {
                                done.lock().expect("lock")[k] = Some(start.elapsed());
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    })
                })
            })
            .collect();
        Watch {
            start,
            done,
            stop,
            threads,
        }
    }

    /// Completion times so far (None: not yet).
    pub fn times(&self) -> Vec<Option<Duration>> {
        self.done.lock().expect("lock").clone()
    }

    /// Wait until every node completed, or `timeout`; returns the times.
    pub fn wait(self, timeout: Duration) -> Vec<Option<Duration>> {
        let deadline = self.start + timeout;
        while Instant::now() < deadline && self.times().iter().any(Option::is_none) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, Ordering::Relaxed);
        let t = self.times();
        for h in self.threads {
            let _ = h.join();
        }
        t
    }
}

/// The `q` quantile (0..=1) of completion times over `n` nodes: the time by which
/// `ceil(q·n)` of them had completed (None if that many never did).
pub fn quantile(times: &[Option<Duration>], q: f64) -> Option<Duration> {
    let mut t: Vec<Duration> = times.iter().flatten().copied().collect();
    t.sort();
    let need = ((times.len() as f64) * q).ceil().max(1.0) as usize;
    t.get(need - 1).copied()
}

/// Wait until every node sees every other node of its site and (with several sites) at
/// least one peer on another site (mDNS on the LAN, the bootstrap across the WAN), as a mesh that has been
/// up a while would. Panics after `timeout`.
pub fn wait_meshed(nodes: &[Vec<Node>], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for site in nodes {
        for n in site {
            loop {
                let s = status(n);
                let ok = s.as_ref().is_some_and(|s| {
                    let same = s.peers.iter().filter(|p| p.site == s.site).count();
                    same + 1 >= site.len() && (nodes.len() == 1 || s.peers.len() > same)
                });
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    // Which of its site's nodes it does not see, and whether they see it.
                    let me = s.as_ref().map(|s| s.node_id.clone()).unwrap_or_default();
                    let missing: Vec<String> = site
                        .iter()
                        .filter_map(status)
                        .filter(|o| o.node_id != me)
                        .filter(|o| {
                            s.as_ref()
                                .is_none_or(|s| s.peers.iter().all(|p| p.node_id != o.node_id))
                        })
                        .map(|o| {
                            let sees = o.peers.iter().any(|p| p.node_id == me);
                            format!(
                                "{} ({} peers; sees this one: {sees})",
                                o.node_id,
                                o.peers.len()
                            )
                        })
                        .collect();
                    panic!(
                        "node {} never met its site: peers' sites {:?}; missing {missing:?}",
                        n.dir.display(),
                        s.map(|s| s.peers.iter().map(|p| p.site.clone()).collect::<Vec<_>>())
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A metric of `node` (first line starting with `name`), read inside its namespace.
pub fn metric(node: &Node, name: &str) -> f64 {
    in_netns(node.netns.as_deref().expect("a bed node"), || {
        node.metric(name)
    })
}

/// The status of `node`, read from inside its namespace.
pub fn status(node: &Node) -> Option<Status> {
    let client = node.client();
    in_netns(node.netns.as_deref().expect("a bed node"), || {
        client.try_status()
    })
}

/// Publish `file` on `channel` as `version` (chunks of `chunk` bytes, immediate rollout)
/// through `node`, signed by `op`; returns the manifest.
pub fn publish(
    op: &Operator,
    node: &Node,
    file: &Path,
    channel: &str,
    version: u64,
    chunk: u64,
) -> pollen_protocol::manifest::Manifest {
    let m = op.manifest(&[file.to_path_buf()], channel, version, chunk);
    let (code, body) = in_netns(node.netns.as_deref().expect("a bed node"), || {
        node.publish(&m, &[file.to_path_buf()])
    });
    assert_eq!(code, 200, "publish: {body}");
    m
}
