//! `pollen-delayline`: the WAN of the multi-site test bed (`pollen_tests::bed`).
//!
//! This kernel has no `netem` qdisc, so latency, jitter and loss between sites come from
//! here: the bed's router namespace routes every packet between sites into a TUN device
//! this process owns; it holds each packet for the one-way latency of the sites it
//! crosses, drops it with their loss rate, and writes it back into the TUN device, from
//! which the kernel forwards it to its destination site. Bandwidth is shaped by the bed
//! with `tbf` on the veth links, not here.
//!
//! ```text
//! pollen-delayline --dev NAME [--seed N] [--stats FILE] [--site S,LATENCY_US,JITTER_US,LOSS]...
//! ```
//!
//! A site is the third octet of a `10.77.S.x` (site LAN) or `10.78.S.x` (site uplink)
//! address. A packet from site A to site B is held `latency(A) + latency(B)` (each
//! ± a uniform jitter) and lost with probability `1 − (1 − loss(A))(1 − loss(B))`:
//! every site hangs off a core on its own WAN link, as in `pollen-sim`. Jitter never
//! reorders packets between the same two sites (a packet leaves no earlier than the one
//! before it), as on a real path; the process pins itself to one CPU so that what it
//! writes enters one CPU's queues in order (the kernel's shaped veths can still reorder
//! a packet now and then, as real paths do). The queue is bounded (`MAX_QUEUED` packets,
//! `MAX_QUEUED_BYTES`); past it packets are dropped and counted. `--stats FILE` is
//! rewritten every second with the counters as JSON. Exits on SIGTERM/SIGINT or when
//! the device goes away; the device (not persistent) goes with it.

// A TUN device and poll(2) need a handful of syscalls; each `unsafe` block says why it
// is sound.
#![allow(unsafe_code)]

use std::collections::{BinaryHeap, HashMap};
use std::io::Write as _;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const MAX_QUEUED: usize = 100_000;
const MAX_QUEUED_BYTES: usize = 64 << 20;
const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;

#[derive(Clone, Copy, Default)]
struct Site {
    latency: Duration,
    jitter: Duration,
    loss: f64,
}

struct Held {
    at: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    // Reversed: BinaryHeap is a max-heap and the earliest release must come out first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Counters {
    forwarded: u64,
    forwarded_bytes: u64,
    lost: u64,
    overflow: u64,
    not_ipv4: u64,
}

/// xorshift64*: deterministic per seed; statistical quality is plenty for loss and jitter.
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn site_of(addr: &[u8]) -> Option<u8> {
    (addr[0] == 10 && (addr[1] == 77 || addr[1] == 78)).then_some(addr[2])
}

fn parse_site(s: &str) -> Result<(u8, Site), String> {
    let p: Vec<&str> = s.split(',').collect();
    let [id, lat, jit, loss] = p[..] else {
        return Err(format!("--site {s}: want S,LATENCY_US,JITTER_US,LOSS"));
    };
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|e| format!("--site {s}: {v}: {e}"))
    };
    let loss: f64 = loss
        .parse()
        .map_err(|e| format!("--site {s}: {loss}: {e}"))?;
    if !(0.0..=1.0).contains(&loss) {
        return Err(format!("--site {s}: loss must be in 0..=1"));
    }
    Ok((
        id.parse().map_err(|e| format!("--site {s}: {id}: {e}"))?,
        Site {
            latency: Duration::from_micros(num(lat)?),
            jitter: Duration::from_micros(num(jit)?),
            loss,
        },
    ))
}

fn open_tun(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() > 15 {
        return Err(std::io::Error::other("device name must be 1..=15 bytes"));
    }
    // SAFETY: a plain open(2) of a path literal; the fd is owned below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open(2) and is not owned elsewhere.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: 16 bytes of name, then the flags (a short) in the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is laid out as.
    let rc = unsafe { libc::ioctl(fd, TUNSETIFF as _, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn main() {
    if let Err(e) = run() {
        eprintln!("pollen-delayline: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut dev = None;
    let mut seed = 1u64;
    let mut stats_path = None;
    let mut sites: HashMap<u8, Site> = HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--dev" => dev = Some(val()?),
            "--seed" => seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--stats" => stats_path = Some(val()?),
            "--site" => {
                let (id, s) = parse_site(&val()?)?;
                sites.insert(id, s);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let dev = dev.ok_or("--dev NAME is required")?;
    let tun = open_tun(&dev).map_err(|e| format!("open TUN {dev}: {e}"))?;
    // SAFETY: installing an async-signal-safe handler that only stores an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    use std::os::fd::AsRawFd;
    let fd = tun.as_raw_fd();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut heap: BinaryHeap<Held> = BinaryHeap::new();
    let mut queued_bytes = 0usize;
    let mut last_release: HashMap<(u8, u8), Instant> = HashMap::new();
    let mut seq = 0u64;
    let mut c = Counters::default();
    let mut buf = vec![0u8; 65_536];
    let mut next_stats = Instant::now();
    while !STOP.load(std::sync::atomic::Ordering::Relaxed) {
        let now = Instant::now();
        // Release what is due.
        while heap.peek().is_some_and(|h| h.at <= now) {
            let h = heap.pop().expect("peeked");
            queued_bytes -= h.packet.len();
            // SAFETY: writing an initialised buffer of its own length to our fd.
            let n = unsafe { libc::write(fd, h.packet.as_ptr().cast(), h.packet.len()) };
            if n >= 0 {
                c.forwarded += 1;
                c.forwarded_bytes += h.packet.len() as u64;
            }
        }
        if now >= next_stats {
            if let Some(p) = &stats_path {
                write_stats(p, &c, heap.len());
            }
            next_stats = now + Duration::from_secs(1);
        }
        let wait = heap
            .peek()
            .map_or(Duration::from_millis(200), |h| {
                h.at.saturating_duration_since(now)
            })
            .min(Duration::from_millis(200));
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // Sub-millisecond waits round up: poll(2) takes milliseconds.
        let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err("TUN device went away".into());
        }
        // Take every packet that is waiting.
        loop {
            // SAFETY: reading into a buffer of its own length from our fd.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let p = &buf[..n as usize];
            let now = Instant::now();
            if p.len() < 20 || p[0] >> 4 != 4 {
                c.not_ipv4 += 1;
                continue;
            }
            let (a, b) = (site_of(&p[12..16]), site_of(&p[16..20]));
            let sa = a.and_then(|s| sites.get(&s)).copied().unwrap_or_default();
            let sb = b.and_then(|s| sites.get(&s)).copied().unwrap_or_default();
            let keep = (1.0 - sa.loss) * (1.0 - sb.loss);
            if rng.next_f64() >= keep {
                c.lost += 1;
                continue;
            }
            if heap.len() >= MAX_QUEUED || queued_bytes + p.len() > MAX_QUEUED_BYTES {
                c.overflow += 1;
                continue;
            }
            let mut delay = sa.latency + sb.latency;
            for j in [sa.jitter, sb.jitter] {
                // Uniform in [-j, +j], never below zero.
                let d = (rng.next_f64() * 2.0 - 1.0) * j.as_secs_f64();
                delay = Duration::from_secs_f64((delay.as_secs_f64() + d).max(0.0));
            }
            let key = (a.unwrap_or(255), b.unwrap_or(255));
            let mut at = now + delay;
            if let Some(prev) = last_release.get(&key) {
                at = at.max(*prev);
            }
            last_release.insert(key, at);
            seq += 1;
            queued_bytes += p.len();
            heap.push(Held {
                at,
                seq,
                packet: p.to_vec(),
            });
        }
    }
    if let Some(p) = &stats_path {
        write_stats(p, &c, heap.len());
    }
    Ok(())
}

fn write_stats(path: &str, c: &Counters, queued: usize) {
    let tmp = format!("{path}.tmp");
    let body = format!(
        "{{\"forwarded\":{},\"forwarded_bytes\":{},\"lost\":{},\"overflow\":{},\"not_ipv4\":{},\"queued\":{}}}\n",
        c.forwarded, c.forwarded_bytes, c.lost, c.overflow, c.not_ipv4, queued
    );
    if let Ok(mut f) = std::fs::File::create(&tmp)
        && f.write_all(body.as_bytes()).is_ok()
    {
        let _ = std::fs::rename(&tmp, path);
    }
}
