//! The soak (opt-in): the multi-site bed for `POLLEN_SOAK_MINUTES` minutes with churn
//! (nodes killed with SIGKILL and restarted), a release every two minutes (staged ones,
//! halted and resumed, and rollbacks among them) and inference load on every node.
//! Resident memory, open file descriptors and threads of every node are sampled each
//! minute; the test prints the series and their slopes, and fails if a node grows
//! without bound, if the mesh does not end on the release the plan ends on, if inference
//! fails outside a node's restarts, or if a node logs an error or warning that is not one
//! of the explained kinds below.
//!
//! ```sh
//! POLLEN_SOAK_MINUTES=30 cargo test -p pollen-tests --test soak -- --nocapture
//! ```

use pollen_tests::bed::{self, Bed, Site, in_netns};
use pollen_tests::mesh::{Node, Operator};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Warnings and errors a soak is expected to log, each with why.
const EXPLAINED: &[(&str, &str)] = &[
    (
        "chunk request timed out",
        "a peer was killed with requests of ours in flight",
    ),
    ("pollen stream", "a killed peer's streams end mid-frame"),
    (
        "was being activated when the node stopped: trying it once more",
        "the churn killed a node while it activated a release",
    ),
    (
        "rolled back",
        "a rollback release replaces the active version",
    ),
    ("was halted", "the operator halted a staged release"),
];

/// Minutes since the start, resident KiB, open descriptors, threads.
type Sample = (f64, u64, u64, u64);

/// One sample of a process: resident KiB, open descriptors, threads.
fn sample(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("VmRSS:")?, fds, field("Threads:")?))
}

/// Least-squares slope of `ys` against `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

fn active(n: &Node) -> Option<u64> {
    bed::status(n)?
        .channels
        .iter()
        .find(|c| c.channel == "digits")?
        .active_version
}

/// A log line's kind: its message with numbers and ids blanked.
fn kind(line: &str) -> String {
    let msg = line
        .split_once(" WARN ")
        .or_else(|| line.split_once(" ERROR "))
        .map_or(line, |(_, m)| m);
    msg.split_whitespace()
        .map(|w| {
            if w.chars().any(|c| c.is_ascii_digit()) {
                "#"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn soak() {
    let Some(minutes) = std::env::var("POLLEN_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse::<u64>().ok())
    else {
        eprintln!("SKIP soak: set POLLEN_SOAK_MINUTES (30 for the documented soak)");
        return;
    };
    let hq = Site::new("hq", 3, 20.0, Duration::from_millis(20));
    let mut far = Site::new("far", 3, 20.0, Duration::from_millis(40));
    far.wan_loss = 0.01;
    let Some(b) = Bed::new(vec![hq, far], 77) else {
        return;
    };
    let mut tmp = tempfile::tempdir().expect("tmp");
    eprintln!("soak for {minutes} min in {}", tmp.path().display());
    if std::env::var_os("POLLEN_BED_KEEP").is_some() {
        tmp.disable_cleanup(true);
    }
    let op = Operator::new(&tmp.path().join("op"), false);
    let args = vec![
        "--trust".to_string(),
        op.trust_file.display().to_string(),
        "--health-interval".to_string(),
        "5s".to_string(),
    ];
    let mut nodes = b.start_nodes(tmp.path(), 0, &args);
    bed::wait_meshed(&nodes, Duration::from_secs(60));
    let flat = |nodes: &Vec<Vec<Node>>| -> Vec<(usize, usize)> {
        (0..nodes.len())
            .flat_map(|i| (0..nodes[i].len()).map(move |j| (i, j)))
            .collect()
    };
    let ids = flat(&nodes);
    let publish = |nodes: &Vec<Vec<Node>>, v: u64, extra: &[&str]| {
        let p = &nodes[0][0];
        let (model, golden) = if v % 2 == 1 {
            ("digits-v1.onnx", "golden-v1.json")
        } else {
            ("digits-v2.onnx", "golden-v2.json")
        };
        in_netns(p.netns.as_deref().expect("bed node"), || {
            op.publish_digits(tmp.path(), p, model, golden, v, extra)
        })
    };
    let cli = |nodes: &Vec<Vec<Node>>, args: &[String]| {
        let p = &nodes[0][0];
        let mut a = args.to_vec();
        a.extend([
            "--key".to_string(),
            op.dir.join("publisher.key").display().to_string(),
            "--node".to_string(),
            p.url(),
        ]);
        in_netns(p.netns.as_deref().expect("bed node"), || {
            pollen_tests::Pollen::in_dir(tmp.path()).run(&a).success()
        });
    };
    publish(&nodes, 1, &[]);

    // Inference load: one client per node, 5 requests a second, at the node's current
    // address (a restart moves it).
    let urls: Arc<Mutex<BTreeMap<(usize, usize), String>>> = Arc::new(Mutex::new(
        ids.iter()
            .map(|&(i, j)| ((i, j), nodes[i][j].url()))
            .collect(),
    ));
    let down: Arc<Mutex<BTreeMap<(usize, usize), bool>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, busy) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let body = std::fs::read(pollen_tests::workspace_dir().join("models/sample-input.json"))
        .expect("sample input");
    let clients: Vec<_> = ids
        .iter()
        .map(|&(i, j)| {
            let ns = b.node_ns(i, j);
            let (urls, down, stop, ok, failed, busy, body) = (
                urls.clone(),
                down.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                busy.clone(),
                body.clone(),
            );
            std::thread::spawn(move || {
                in_netns(&ns, || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .timeout_global(Some(Duration::from_secs(10)))
                        .http_status_as_error(false)
                        .build()
                        .into();
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(200));
                        let url = urls.lock().expect("urls")[&(i, j)].clone();
                        let r = agent
                            .post(format!("{url}/v2/models/digits/infer"))
                            .content_type("application/json")
                            .send(&body[..]);
                        let is_down = down.lock().expect("down").get(&(i, j)) == Some(&true);
                        match r {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            // A node being restarted, or still loading after its restart.
                            _ if is_down => {}
                            // Not ready (loading after a restart): counted apart.
                            Ok(r) if r.status() == 503 => {
                                busy.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
        })
        .collect();

    let start = Instant::now();
    let end = start + Duration::from_secs(minutes * 60);
    let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
    let mut next_sample = start;
    let mut version = 1u64;
    let mut last_active = 1u64; // what the plan ends on so far
    let mut round = 0u64;
    let mut next_round = start + Duration::from_secs(20);
    let mut victim = 0usize;
    let mut restart_at: Option<(Instant, (usize, usize))> = None;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            let t = now.duration_since(start).as_secs_f64() / 60.0;
            let mut row = Vec::new();
            for &(i, j) in &ids {
                if let Some((rss, fds, threads)) = sample(nodes[i][j].pid()) {
                    samples
                        .entry((i, j))
                        .or_default()
                        .push((t, rss, fds, threads));
                    row.push(format!(
                        "{}-{j} {}M/{}fd/{}t",
                        b.sites[i].name,
                        rss >> 10,
                        fds,
                        threads
                    ));
                }
            }
            eprintln!(
                "[{t:5.1} min] v{version} (plan ends on v{last_active}); inference ok {} failed {}; {}",
                ok.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
                row.join(", ")
            );
            next_sample += Duration::from_secs(60);
        }
        if let Some((at, (i, j))) = restart_at
            && now >= at
        {
            nodes[i][j].restart();
            urls.lock().expect("urls").insert((i, j), nodes[i][j].url());
            // Loading the model again takes a moment after the restart.
            std::thread::sleep(Duration::from_secs(5));
            down.lock().expect("down").insert((i, j), false);
            restart_at = None;
        }
        if now >= next_round {
            round += 1;
            version += 1;
            match round % 4 {
                // A staged release that the operator halts, then resumes.
                2 => {
                    publish(
                        &nodes,
                        version,
                        &["--stages", "50%,100%", "--stage-interval", "20s"],
                    );
                    cli(
                        &nodes,
                        &[
                            "rollout".into(),
                            "halt".into(),
                            "digits".into(),
                            "--version".into(),
                            version.to_string(),
                        ],
                    );
                    std::thread::sleep(Duration::from_secs(30));
                    cli(
                        &nodes,
                        &[
                            "rollout".into(),
                            "resume".into(),
                            "digits".into(),
                            "--version".into(),
                            version.to_string(),
                        ],
                    );
                    last_active = version;
                }
                // A rollback to the release before the last.
                3 => {
                    cli(
                        &nodes,
                        &[
                            "rollout".into(),
                            "rollback".into(),
                            "digits".into(),
                            "--to".into(),
                            (version - 2).to_string(),
                        ],
                    );
                    last_active = version;
                }
                // Immediate releases.
                _ => {
                    publish(&nodes, version, &[]);
                    last_active = version;
                }
            }
            // Churn: kill one node (never the publisher) and restart it 20 s later.
            if restart_at.is_none() {
                victim = victim % (ids.len() - 1) + 1;
                let (i, j) = ids[victim];
                down.lock().expect("down").insert((i, j), true);
                nodes[i][j].kill();
                restart_at = Some((Instant::now() + Duration::from_secs(20), (i, j)));
            }
            next_round += Duration::from_secs(120);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if let Some((_, (i, j))) = restart_at {
        nodes[i][j].restart();
        urls.lock().expect("urls").insert((i, j), nodes[i][j].url());
    }
    // Every node ends on the plan's last release.
    let deadline = Instant::now() + Duration::from_secs(180);
    for &(i, j) in &ids {
        while active(&nodes[i][j]) != Some(last_active) {
            assert!(
                Instant::now() < deadline,
                "{}-{j} serves {:?}, the plan ends on v{last_active}",
                b.sites[i].name,
                active(&nodes[i][j])
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let (ok, failed, busy) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed),
    );
    eprintln!(
        "every node on v{last_active}; inference: {ok} answered, {busy} not ready (503), {failed} failed"
    );

    // Slopes after the first 5 minutes (start-up, first loads), per node.
    let mut worst_rss = 0.0f64;
    for (&(i, j), s) in &samples {
        let tail: Vec<_> = s.iter().filter(|x| x.0 >= 5.0).collect();
        if tail.len() < 3 {
            continue;
        }
        let xs: Vec<f64> = tail.iter().map(|x| x.0).collect();
        let rss = slope(&xs, &tail.iter().map(|x| x.1 as f64).collect::<Vec<_>>());
        let fds = slope(&xs, &tail.iter().map(|x| x.2 as f64).collect::<Vec<_>>());
        let thr = slope(&xs, &tail.iter().map(|x| x.3 as f64).collect::<Vec<_>>());
        eprintln!(
            "{}-{j}: RSS MiB {:?}; slope {:+.0} KiB/min, fds {:+.2}/min, threads {:+.2}/min",
            b.sites[i].name,
            s.iter().map(|x| x.1 >> 10).collect::<Vec<_>>(),
            rss,
            fds,
            thr
        );
        worst_rss = worst_rss.max(rss);
        assert!(
            fds.abs() < 1.0,
            "{}-{j}: descriptors grow {fds:+.2}/min",
            b.sites[i].name
        );
        assert!(
            thr.abs() < 1.0,
            "{}-{j}: threads grow {thr:+.2}/min",
            b.sites[i].name
        );
    }
    // Errors and warnings, by kind.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for &(i, j) in &ids {
        for l in nodes[i][j].log().lines() {
            let plain = strip_ansi(l);
            if plain.contains(" WARN ") || plain.contains(" ERROR ") {
                *kinds.entry(kind(&plain)).or_default() += 1;
            }
        }
    }
    let mut unexplained = Vec::new();
    for (k, n) in &kinds {
        let why = EXPLAINED
            .iter()
            .find(|(p, _)| k.contains(p))
            .map(|(_, w)| *w);
        eprintln!("{n:6} × {k}  [{}]", why.unwrap_or("UNEXPLAINED"));
        if why.is_none() {
            unexplained.push(k.clone());
        }
    }
    assert!(
        unexplained.is_empty(),
        "unexplained log lines: {unexplained:#?}"
    );
    assert!(
        (failed as f64) < 0.01 * (ok + failed) as f64,
        "{failed} of {} inference requests failed outside restarts",
        ok + failed
    );
    // A leak of a few KiB per request or per chunk would show as MiB per minute here.
    assert!(
        worst_rss < 1024.0,
        "RSS grows {worst_rss:.0} KiB/min on some node"
    );
}

/// `s` without ANSI colour sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        if c == '\u{1b}' {
            esc = true;
        } else if esc {
            if c.is_ascii_alphabetic() {
                esc = false;
            }
        } else {
            out.push(c);
        }
    }
    out
}
