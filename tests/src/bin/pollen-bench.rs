//! `pollen-bench`: node benchmarks, each against a baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p pollen-tests --bin pollen-bench -- [verify|transfer|all] [--mib N]
//! ```
//!
//! * `verify`: chunk verification (length check + BLAKE3 chaining value at the chunk's
//!   offset) against raw `blake3::hash` of the same chunks. Goal: ratio >= 0.9.
//! * `transfer`: a file published on one `pollen run` and fetched by another over
//!   loopback into its store (verified, written, synced, renamed), against a plain TCP copy
//!   of the same bytes into a file (written and synced). Median of 3 each; goal: ratio >=
//!   0.5. Also the peak RSS (VmHWM) of the seeding and the downloading node; goal < 150 MiB.
//!
//! * `lm DIR`: a language model (DIR is a variant directory with `model.onnx`,
//!   `tokenizer.json`, `generation.json`, or holds several such directories, e.g. the
//!   `fp32/` and `int8/` that `scripts/slm/gguf_to_onnx.py` writes). For each: time to
//!   first token on a 64-token prompt and decode tokens/s over 128 new tokens (greedy,
//!   end-of-sequence ignored), through a `pollen run` node's OpenAI API (streamed
//!   `/v1/completions` with the prompt as token ids), through [`LmModel`] called directly
//!   in this process, and through onnxruntime on the same graph
//!   (`scripts/slm/bench_ort.py`), at 1 and 2 threads; the node's resident memory against
//!   onnxruntime's; and the time from the release complete on disk (publish done) to the
//!   first token. Goals: decode >= 0.8x onnxruntime, HTTP adds < 2% to decode time, memory
//!   <= 1.2x onnxruntime.
//!
//! Uses the `pollen` binary next to this one (build both with `--release`), or
//! `POLLEN_BIN`.

use pollen_protocol::chunking::{ChunkSize, spec_for_bytes};
use pollen_tests::mesh::{Node, Operator, test_bytes};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GIB: f64 = (1u64 << 30) as f64;

/// CPU-seconds per GiB of `bytes` between two [`cpu_secs`] readings (user plus system).
fn cpu_per_gib(before: (f64, f64), after: (f64, f64), bytes: u64) -> f64 {
    (after.0 + after.1 - before.0 - before.1) / (bytes as f64 / GIB)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64
}

fn verify(mib: usize) {
    let data = test_bytes(mib << 20, 7);
    println!("\n== chunk verification, {mib} MiB in memory, one thread");
    println!(
        "{:<10} {:>14} {:>14} {:>8}",
        "chunk", "raw blake3", "verify_chunk", "ratio"
    );
    for chunk in [16 * 1024u64, 1 << 20, 4 << 20] {
        let cs = ChunkSize::new(chunk).expect("chunk size");
        let spec = spec_for_bytes(&data, cs);
        let mut raw = vec![];
        let mut ver = vec![];
        for _ in 0..5 {
            let t = Instant::now();
            let mut x = 0u8;
            for c in data.chunks(chunk as usize) {
                x ^= blake3::hash(c).as_bytes()[0];
            }
            std::hint::black_box(x);
            raw.push(gib_s(data.len() as u64, t.elapsed()));
            let t = Instant::now();
            for (i, c) in data.chunks(chunk as usize).enumerate() {
                spec.verify_chunk(i as u64, c).expect("valid chunk");
            }
            ver.push(gib_s(data.len() as u64, t.elapsed()));
        }
        let (r, v) = (median(raw), median(ver));
        println!(
            "{:<10} {:>9.2} GiB/s {:>9.2} GiB/s {:>8.3}",
            format!("{} KiB", chunk / 1024),
            r,
            v,
            v / r
        );
    }
}

fn tcp_copy(src: &Path, dst: &Path) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dst = dst.to_path_buf();
    let t = Instant::now();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut f = std::fs::File::create(&dst).expect("create");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n]).expect("write");
        }
        f.sync_all().expect("sync");
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut f = std::fs::File::open(src).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).expect("send");
    }
    drop(s);
    rx.join().expect("receiver");
    t.elapsed()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// A `/proc/PID/status` field in KiB (`VmHWM:`, `VmRSS:`), 0 if unreadable.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User and system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / tick;
    (get(11), get(12))
}

fn transfer(mib: usize) {
    let tmp = tempfile::tempdir_in(
        std::env::var_os("BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir),
    )
    .expect("tmp");
    let op = Operator::new(&tmp.path().join("op"), false);
    let src = tmp.path().join("model.bin");
    {
        let mut f = std::fs::File::create(&src).expect("create");
        for i in 0..mib {
            f.write_all(&test_bytes(1 << 20, i as u64)).expect("write");
        }
    }
    let size = (mib as u64) << 20;
    println!("\n== transfer of {mib} MiB over loopback (median of 3)");
    let mut tcp = vec![];
    let mut p2p = vec![];
    // CPU-seconds per GiB within the timed window: the copy (both ends, this process),
    // the seeding node, the downloading node.
    let (mut tcp_cpu, mut seed_cpu, mut dl_cpu) = (vec![], vec![], vec![]);
    let mut seed_rss = 0;
    let mut dl_rss = 0;
    for round in 0..3 {
        let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
        let seeder = Node::start(&tmp.path().join(format!("s{round}")), &trust);
        let m = op.manifest(std::slice::from_ref(&src), "bench.model", 1, 1 << 20);
        // Both nodes up and connected, the file already in the seeder's store: the clock
        // runs from the manifest's injection to the last chunk renamed into place.
        seeder.upload(&m, std::slice::from_ref(&src));
        let mut args = trust.clone();
        args.extend(["--bootstrap".to_string(), seeder.addr()]);
        let dl = Node::start(&tmp.path().join(format!("d{round}")), &args);
        dl.wait(Duration::from_secs(30), "connected", |s| {
            !s.peers.is_empty()
        });

        // The copy runs just before the download and its file is deleted at once, so the
        // download's page cache can reuse the very memory the copy's did. On this VM,
        // page-cache memory the guest has not used lately is slow to fault in (a plain
        // pwrite loop: 0.3 s/GiB for the first GiB after a delete, 1.8-4.2 s/GiB for the
        // next ones), so the two must write into the same kind of memory.
        let dst = tmp.path().join(format!("copy{round}"));
        let c0 = cpu_secs(std::process::id());
        tcp.push(gib_s(size, tcp_copy(&src, &dst)));
        let c1 = cpu_secs(std::process::id());
        tcp_cpu.push(cpu_per_gib(c0, c1, size));
        let _ = std::fs::remove_file(&dst);

        let (s0, d0) = (cpu_secs(seeder.pid()), cpu_secs(dl.pid()));
        let t = Instant::now();
        let (code, body) = seeder.post_manifest(&m.signed.to_bytes());
        assert_eq!(code, 200, "{body}");
        dl.wait(Duration::from_secs(600), "complete", |s| {
            Node::has_release(s, "bench.model", 1)
        });
        let d = t.elapsed();
        p2p.push(gib_s(size, d));
        let (s1, d1) = (cpu_secs(seeder.pid()), cpu_secs(dl.pid()));
        seed_cpu.push(cpu_per_gib(s0, s1, size));
        dl_cpu.push(cpu_per_gib(d0, d1, size));
        // The peak includes the activation that follows: the file is tried as a model
        // (and refused: it is not one).
        let s = dl.wait(Duration::from_secs(120), "activation tried", |s| {
            s.channels
                .iter()
                .flat_map(|c| &c.releases)
                .any(|r| r.version == 1 && r.state != "LOADING")
        });
        if round == 0 {
            let r = s
                .channels
                .iter()
                .flat_map(|c| &c.releases)
                .find(|r| r.version == 1);
            println!(
                "  activation on the downloader: {}",
                r.map_or(String::new(), |r| format!("{} {}", r.state, r.reason))
            );
        }
        seed_rss = seed_rss.max(vm_hwm_kib(seeder.pid()));
        dl_rss = dl_rss.max(vm_hwm_kib(dl.pid()));
        println!(
            "  round {round}: {:.2} s; within it, seeder user {:.2} s sys {:.2} s, downloader user {:.2} s sys {:.2} s",
            d.as_secs_f64(),
            s1.0 - s0.0,
            s1.1 - s0.1,
            d1.0 - d0.0,
            d1.1 - d0.1,
        );
        let cid = m.body.artifact.variants[0].files[0]
            .spec
            .content_id
            .to_hex();
        assert_eq!(
            std::fs::metadata(dl.blob(&cid))
                .map(|m| m.len())
                .unwrap_or(0),
            size,
            "complete blob"
        );
        drop(dl);
        drop(seeder);
        let _ = std::fs::remove_dir_all(tmp.path().join(format!("s{round}")));
        let _ = std::fs::remove_dir_all(tmp.path().join(format!("d{round}")));
    }
    let (t, p) = (median(tcp.clone()), median(p2p.clone()));
    println!("{:<36} {:>10}", "what", "GiB/s");
    println!(
        "{:<36} {:>10.3}   runs {:?}",
        "plain TCP copy into a file",
        t,
        tcp.iter()
            .map(|x| (x * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    println!(
        "{:<36} {:>10.3}   runs {:?}",
        "pollen node to node, into the store",
        p,
        p2p.iter()
            .map(|x| (x * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    println!("{:<36} {:>10.3}", "ratio (goal >= 0.8)", p / t);
    println!(
        "CPU-s per GiB, median: copy (both ends) {:.2}; seeding node {:.2}; downloading node {:.2}",
        median(tcp_cpu),
        median(seed_cpu),
        median(dl_cpu)
    );
    println!(
        "{:<36} {:>7} MiB",
        "peak RSS of the seeding node",
        seed_rss / 1024
    );
    println!(
        "{:<36} {:>7} MiB",
        "peak RSS of the downloading node",
        dl_rss / 1024
    );
    println!(
        "(timed from the manifest's injection on the seeder to the complete file on the downloader)"
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// POST /infer over loopback against calling tract directly on the same input.
fn serve() {
    let models = pollen_tests::workspace_dir().join("models");
    let tmp = tempfile::tempdir().expect("tmp");
    let op = Operator::new(&tmp.path().join("op"), false);
    let node = Node::start(
        &tmp.path().join("n"),
        &["--trust".to_string(), op.trust_file.display().to_string()],
    );
    let model = models.join("digits-v1.onnx");
    let m = op.manifest(std::slice::from_ref(&model), "digits", 1, 16 * 1024);
    let (code, body) = node.publish(&m, std::slice::from_ref(&model));
    assert_eq!(code, 200, "{body}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/v2/models/digits/infer", node.url());
    let row: Vec<f32> = (0..64).map(|i| (i % 17) as f32).collect();
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent
        .post(&url)
        .send_json(&body)
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "model never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    // tract directly, same model and input, in this process.
    let direct = pollen_node::serving::LoadedModel::load(
        &model,
        "digits",
        1,
        pollen_protocol::ManifestId([0; 32]),
        &pollen_protocol::manifest::ServingSpec::default(),
        &pollen_node::serving::GoldenSet::default(),
        &pollen_node::serving::ServingLimits::new(u64::MAX),
    )
    .expect("load");
    let input = pollen_node::serving::kserve::Tensor {
        name: "input".into(),
        datatype: pollen_protocol::manifest::DType::F32,
        shape: vec![1, 64],
        data: row.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let n = 2000;
    let mut d = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(direct.run(std::slice::from_ref(&input)).expect("run"));
        d.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut h = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut r = agent.post(&url).send_json(&body).expect("infer");
        let _ = r.body_mut().read_to_vec();
        h.push(t.elapsed().as_secs_f64() * 1e3);
    }
    d.sort_by(|a, b| a.total_cmp(b));
    h.sort_by(|a, b| a.total_cmp(b));
    println!("\n== inference, digits v1, one [1,64] FP32 input, {n} requests each");
    println!("{:<32} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!(
        "{:<32} {:>10.4} {:>10.4}",
        "tract directly",
        percentile(&d, 0.5),
        percentile(&d, 0.99)
    );
    println!(
        "{:<32} {:>10.4} {:>10.4}",
        "POST /infer over loopback (JSON)",
        percentile(&h, 0.5),
        percentile(&h, 0.99)
    );
    println!(
        "{:<32} {:>10.4}   (goal < 0.2 ms)",
        "added cost at p50",
        percentile(&h, 0.5) - percentile(&d, 0.5)
    );
    let throughput = |clients: usize| {
        let stop = Instant::now() + Duration::from_secs(3);
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (agent, url, body) = (agent.clone(), url.clone(), body.clone());
                std::thread::spawn(move || {
                    let mut k = 0u64;
                    while Instant::now() < stop {
                        let mut r = agent.post(&url).send_json(&body).expect("infer");
                        let _ = r.body_mut().read_to_vec();
                        k += 1;
                    }
                    k
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .sum::<u64>() as f64
            / 3.0
    };
    let one = throughput(1);
    let four = throughput(4);
    println!("{:<32} {:>10.0} req/s", "1 client", one);
    println!("{:<32} {:>10.0} req/s", "4 clients", four);
    println!(
        "{:<32} {:>10.2}   (goal >= 1.6 on 2 cores)",
        "ratio",
        four / one
    );
}

/// The prompt of `bench_ort.py`, cut to 64 tokens the same way.
const LM_TEXT: &str = "Pollination is the transfer of pollen from the anther of a flower to the \
    stigma, which allows fertilisation and the production of seeds. Bees, butterflies, moths, \
    beetles, birds and bats carry pollen between flowers while they feed on nectar, and the wind \
    carries the light pollen of grasses and many trees over long distances. Farmers rent hives \
    of honey bees to pollinate almonds, apples and blueberries every spring.";
const LM_PROMPT: usize = 64;
const LM_NEW: usize = 128;
const LM_RUNS: usize = 3;

/// (time to first token ms, decode tokens/s): medians.
type LmFigures = (f64, f64);

fn lm_prompt(lm: &pollen_node::serving::lm::LmModel) -> Vec<u32> {
    let ids = lm.encode(LM_TEXT).expect("tokenise");
    ids.iter().copied().cycle().take(LM_PROMPT).collect()
}

/// A language model's variant directory, loaded as the node loads it.
fn lm_load(dir: &Path) -> pollen_node::serving::LoadedModel {
    let limits = pollen_node::serving::ServingLimits::new(u64::MAX / 4);
    pollen_node::serving::lm::engine::load_dir(dir, &limits).expect("a language model")
}

/// tract through [`LmModel`] in this process, with `threads` threads for its products.
fn lm_direct(m: &pollen_node::serving::LoadedModel, threads: usize) -> (LmFigures, Vec<u32>) {
    use pollen_node::serving::lm::engine::argmax;
    let lm = m.lm().expect("attached");
    let prompt = lm_prompt(lm);
    let executor = pollen_node::serving::lm::executor(threads);
    let run = |new: usize| {
        pollen_node::serving::lm::with_executor(executor.clone(), || {
            let t = Instant::now();
            let mut cache = lm.new_cache();
            let logits = lm.feed(&mut cache, &prompt).expect("prefill");
            let mut tok = argmax(&logits).expect("token") as u32;
            let ttft = t.elapsed();
            let t = Instant::now();
            for _ in 1..new {
                let logits = lm.feed(&mut cache, &[tok]).expect("step");
                tok = argmax(&logits).expect("token") as u32;
            }
            (
                ttft.as_secs_f64() * 1e3,
                (new - 1) as f64 / t.elapsed().as_secs_f64(),
            )
        })
    };
    run(8);
    let runs: Vec<(f64, f64)> = (0..LM_RUNS).map(|_| run(LM_NEW)).collect();
    (
        (
            median(runs.iter().map(|r| r.0).collect()),
            median(runs.iter().map(|r| r.1).collect()),
        ),
        prompt,
    )
}

/// The variant's golden prompts (`golden_prompts.json`, as `pollen publish` reads it)
/// scored through tract: greedy agreement and mean log-likelihood.
fn lm_golden(dir: &Path, m: &pollen_node::serving::LoadedModel) {
    use pollen_node::serving::lm::config::{GOLDEN_PROMPTS_FILE, GoldenPromptsFile};
    let path = dir.join(GOLDEN_PROMPTS_FILE);
    if !path.is_file() {
        return;
    }
    let golden = GoldenPromptsFile::read(&path).expect("golden prompts");
    let a = m
        .lm()
        .expect("attached")
        .score(&golden.spec())
        .expect("scored");
    println!(
        "golden prompts: {} of {} tokens agree, mean log-likelihood {:.4}",
        a.agreed,
        a.total,
        a.log_likelihood / a.total as f64
    );
}

/// onnxruntime on the same graph: (figures, peak RSS MiB).
fn lm_ort(dir: &Path, threads: usize) -> (LmFigures, f64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slm/bench_ort.py");
    let out = std::process::Command::new("python3")
        // onnxruntime as a user runs it: without the huge pages the node gives itself.
        .env_remove("GLIBC_TUNABLES")
        .arg(script)
        .arg(dir)
        .args([
            "--threads",
            &threads.to_string(),
            "--runs",
            &LM_RUNS.to_string(),
        ])
        .output()
        .expect("python3 with onnxruntime");
    assert!(
        out.status.success(),
        "bench_ort.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    ((f("ttft_ms"), f("decode_tok_s")), f("peak_rss_mb"))
}

/// What a node serving a language model measured.
struct NodeLm {
    /// Client-side medians.
    figures: LmFigures,
    /// From the release complete on disk to the first token.
    to_first_token: Duration,
    /// VmHWM and VmRSS, MiB.
    hwm: f64,
    rss: f64,
    /// Over the timed generations: the decode time the client saw (first token received
    /// to the last) over the decode time the node measured for them (`/metrics`), less 1.
    http_added: f64,
}

/// A node serving `dir` with `threads` generation threads.
fn lm_node(dir: &Path, threads: usize, prompt: &[u32]) -> NodeLm {
    let tmp = tempfile::tempdir().expect("tmp");
    let op = Operator::new(&tmp.path().join("op"), false);
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, format!("generation_threads = {threads}\n")).expect("config");
    let node = Node::start(
        &tmp.path().join("n"),
        &[
            "--trust".to_string(),
            op.trust_file.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ],
    );
    pollen_tests::Pollen::in_dir(tmp.path())
        .run([
            "publish".to_string(),
            "--lm".into(),
            dir.display().to_string(),
            "--channel".into(),
            "lm".into(),
            "--version".into(),
            "1".into(),
            "--key".into(),
            op.dir.join("publisher.key").display().to_string(),
            "--node".into(),
            node.url(),
        ])
        .success();
    let complete = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/v1/completions", node.url());
    let body = |max: usize, stream: bool| {
        serde_json::json!({
            "model": "lm", "prompt": prompt, "max_tokens": max, "temperature": 0,
            "ignore_eos": true, "stream": stream, "stream_options": {"include_usage": true},
        })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = agent.post(&url).send_json(body(1, false)).expect("post");
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the model never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    let to_first_token = complete.elapsed();
    let mut runs = Vec::new();
    let served = || node.metric("pollen_lm_decode_seconds_total");
    let (mut served_from, mut client_decode) = (0.0, 0.0);
    for run in 0..LM_RUNS + 1 {
        if run == 1 {
            served_from = served();
        }
        let t = Instant::now();
        let mut r = agent
            .post(&url)
            .send_json(body(LM_NEW, true))
            .expect("post");
        assert_eq!(r.status(), 200);
        let reader = std::io::BufReader::new(r.body_mut().as_reader());
        let (mut first, mut tokens) = (None, 0u64);
        for line in std::io::BufRead::lines(reader) {
            let line = line.expect("stream");
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: serde_json::Value = serde_json::from_str(data).expect("event");
            if first.is_none()
                && v["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
            {
                first = Some(t.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
        }
        let (end, first) = (t.elapsed(), first.expect("a token"));
        assert_eq!(tokens, LM_NEW as u64);
        if run > 0 {
            client_decode += (end - first).as_secs_f64();
        }
        runs.push((
            first.as_secs_f64() * 1e3,
            (tokens - 1) as f64 / (end - first).as_secs_f64(),
        ));
    }
    runs.remove(0);
    let served_decode = served() - served_from;
    let mib = |field: &str| status_kib(node.pid(), field) as f64 / 1024.0;
    NodeLm {
        figures: (
            median(runs.iter().map(|r| r.0).collect()),
            median(runs.iter().map(|r| r.1).collect()),
        ),
        to_first_token,
        hwm: mib("VmHWM:"),
        rss: mib("VmRSS:"),
        http_added: client_decode / served_decode - 1.0,
    }
}

fn lm(dir: &Path) {
    let variants: Vec<PathBuf> = if dir.join("model.onnx").is_file() {
        vec![dir.to_path_buf()]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("DIR")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("model.onnx").is_file())
            .collect();
        v.sort();
        v
    };
    println!(
        "\n== language model: {LM_PROMPT}-token prompt, {LM_NEW} new tokens (greedy, EOS ignored), \
         median of {LM_RUNS}"
    );
    println!(
        "{:<8} {:>3} {:<22} {:>9} {:>9} {:>9}",
        "variant", "thr", "runtime", "TTFT ms", "tok/s", "vs ort"
    );
    for v in &variants {
        let name = v.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let m = lm_load(v);
        for threads in [1, 2] {
            let (ort, ort_rss) = lm_ort(v, threads);
            let ((dt, dd), prompt) = lm_direct(&m, threads);
            let n = lm_node(v, threads, &prompt);
            let ((nt, nd), first, hwm, rss) = (n.figures, n.to_first_token, n.hwm, n.rss);
            let row = |what: &str, t: f64, d: f64| {
                println!(
                    "{name:<8} {threads:>3} {what:<22} {t:>9.1} {d:>9.1} {:>9.2}",
                    d / ort.1
                );
            };
            row("onnxruntime (python)", ort.0, ort.1);
            row("tract direct", dt, dd);
            row("pollen node, HTTP", nt, nd);
            println!(
                "{name:<8} {threads:>3} HTTP adds {:.2}% to the node's own decode time (the same \
                 generations; {:.1}% against tract direct); node RSS {rss:.0} MiB \
                 (peak {hwm:.0}) vs onnxruntime peak {ort_rss:.0} MiB: {:.2}x; complete on disk \
                 to first token {:.2} s",
                n.http_added * 100.0,
                (dd / nd - 1.0) * 100.0,
                rss / ort_rss,
                first.as_secs_f64()
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("all");
    let mib = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    if std::env::var_os("POLLEN_BIN").is_none()
        && let Ok(me) = std::env::current_exe()
    {
        let sibling = me.with_file_name("pollen");
        if sibling.is_file() {
            pollen_tests::set_pollen_bin(sibling);
        }
    }
    match what {
        "verify" => verify(mib.unwrap_or(256)),
        "transfer" => transfer(mib.unwrap_or(1024)),
        "serve" => serve(),
        "lm-direct" => {
            // tract direct, in the memory the node gives it.
            pollen_node::serving::model::restart_with_huge_pages();
            let dir = Path::new(args.get(1).map(String::as_str).expect("DIR"));
            let t = Instant::now();
            let m = lm_load(dir);
            pollen_node::serving::model::release_freed_memory();
            let huge = std::fs::read_to_string("/proc/self/smaps_rollup")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("AnonHugePages:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                })
                .unwrap_or(0);
            println!(
                "load {:.2} s, peak RSS {} MiB, resident after the load {} MiB ({} MiB in \
                 huge pages)",
                t.elapsed().as_secs_f64(),
                vm_hwm_kib(std::process::id()) / 1024,
                status_kib(std::process::id(), "VmRSS:") / 1024,
                huge / 1024
            );
            // POLLEN_BENCH_THREADS=N: one thread count only (for a profiler).
            let counts: Vec<usize> = match std::env::var("POLLEN_BENCH_THREADS") {
                Ok(n) => vec![n.parse().expect("POLLEN_BENCH_THREADS: a number")],
                Err(_) => vec![1, 2],
            };
            for t in counts {
                let ((ttft, tok_s), _) = lm_direct(&m, t);
                println!("threads {t}: ttft {ttft:.1} ms, decode {tok_s:.1} tok/s");
            }
            lm_golden(dir, &m);
        }
        "lm" => {
            // tract direct in the memory the node gives it (the node restarts itself so).
            pollen_node::serving::model::restart_with_huge_pages();
            lm(Path::new(
                args.get(1)
                    .map(String::as_str)
                    .expect("pollen-bench lm DIR"),
            ))
        }
        "all" => {
            verify(256);
            serve();
            transfer(mib.unwrap_or(1024));
        }
        other => {
            eprintln!("unknown benchmark {other:?}: verify, serve, transfer or all");
            std::process::exit(2);
        }
    }
}
