//! Node metrics, rendered in the Prometheus text format at `GET /metrics`.
//!
//! Counters are atomics, updated from the actor and the per-peer stream tasks; labelled
//! families use small bounded maps (peers are bounded by the connection limit, reasons by
//! the protocol's fixed labels).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether a peer is on this node's site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerClass {
    /// Same site (LAN).
    SameSite,
    /// Another site, or unknown.
    Other,
}

impl PeerClass {
    fn label(self) -> &'static str {
        match self {
            PeerClass::SameSite => "same_site",
            PeerClass::Other => "other",
        }
    }
}

/// Upper bounds (seconds) of the inference latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Debug, Default, Clone)]
struct InferStats {
    requests: u64,
    errors: u64,
    buckets: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
}

/// What a language model's generations did.
#[derive(Debug, Default, Clone, Copy)]
struct GenStats {
    ok: u64,
    cancelled: u64,
    errors: u64,
    bad_input: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft_sum: f64,
    decode_seconds: f64,
    decode_tokens: u64,
}

/// Most distinct peers kept in per-peer families.
const MAX_PEER_LABELS: usize = 1024;

/// The node's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connected peers (protocol level).
    pub peers: AtomicU64,
    bytes_in_same: AtomicU64,
    bytes_in_other: AtomicU64,
    bytes_out_same: AtomicU64,
    bytes_out_other: AtomicU64,
    /// Chunks verified and stored.
    pub chunks_verified: AtomicU64,
    /// Chunks that failed verification.
    pub chunks_failed: AtomicU64,
    /// Chunks received that were already held.
    pub chunks_duplicate: AtomicU64,
    /// Chunks uploaded.
    pub chunks_uploaded: AtomicU64,
    /// Chunk requests answered `Busy` (uploads taken and `queued_uploads` waiting).
    pub chunks_busy: AtomicU64,
    /// Manifests accepted.
    pub manifests_accepted: AtomicU64,
    /// Store errors (disk full, IO).
    pub store_errors: AtomicU64,
    /// Connections established through a relay (/p2p-circuit).
    pub relayed_connections: AtomicU64,
    /// Peers whose Pollen streams moved from a relayed connection to a direct one.
    pub moved_off_relay: AtomicU64,
    /// Penalties the core gave peers (timeouts, bad frames, corrupt chunks).
    pub peer_penalties: AtomicU64,
    /// Peers disconnected and refused for misconduct (their penalties reached the limit).
    pub peers_banned: AtomicU64,
    /// Inbound pollen streams closed at once: the peer had as many as it may.
    pub streams_refused: AtomicU64,
    /// Inbound pollen streams closed because a Hello or a frame was late.
    pub streams_timed_out: AtomicU64,
    /// Control frames to peers dropped: the peer's queue was full.
    pub control_dropped: AtomicU64,
    /// Chunk frames dropped: no request of ours to that peer had their id.
    pub chunks_unsolicited: AtomicU64,
    rejected: Mutex<BTreeMap<(String, String), u64>>,
    inference: Mutex<BTreeMap<(String, u64), InferStats>>,
    generations: Mutex<BTreeMap<(String, u64), GenStats>>,
    chunks_from: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    /// Count bytes received from a peer of `class`.
    pub fn bytes_in(&self, class: PeerClass, n: u64) {
        match class {
            PeerClass::SameSite => &self.bytes_in_same,
            PeerClass::Other => &self.bytes_in_other,
        }
        .fetch_add(n, Ordering::Relaxed);
    }

    /// Count bytes sent to a peer of `class`.
    pub fn bytes_out(&self, class: PeerClass, n: u64) {
        match class {
            PeerClass::SameSite => &self.bytes_out_same,
            PeerClass::Other => &self.bytes_out_other,
        }
        .fetch_add(n, Ordering::Relaxed);
    }

    /// Count a rejected object.
    pub fn rejected(&self, kind: &str, reason: &str) {
        let mut m = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < 256 || m.contains_key(&(kind.to_string(), reason.to_string())) {
            *m.entry((kind.to_string(), reason.to_string())).or_default() += 1;
        }
    }

    /// Count a chunk stored that came from `peer`.
    pub fn chunk_from(&self, peer: &str) {
        let mut m = self.chunks_from.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < MAX_PEER_LABELS || m.contains_key(peer) {
            *m.entry(peer.to_string()).or_default() += 1;
        }
    }

    /// Count an inference request for (model, version): its latency and whether it failed.
    pub fn inference(&self, model: &str, version: u64, seconds: f64, error: bool) {
        let mut m = self.inference.lock().unwrap_or_else(|e| e.into_inner());
        let key = (model.to_string(), version);
        if m.len() >= 256 && !m.contains_key(&key) {
            return;
        }
        let st = m.entry(key).or_default();
        st.requests += 1;
        st.errors += u64::from(error);
        st.sum += seconds;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *le {
                st.buckets[i] += 1;
            }
        }
    }

    /// Count a generation of (model, version): how it went and, when it ran, its figures.
    pub fn generation(
        &self,
        model: &str,
        version: u64,
        done: Option<&crate::serving::lm::generate::Done>,
        outcome: crate::serving::Outcome,
    ) {
        use crate::serving::Outcome;
        let mut m = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        let key = (model.to_string(), version);
        if m.len() >= 256 && !m.contains_key(&key) {
            return;
        }
        let st = m.entry(key).or_default();
        let cancelled =
            done.is_some_and(|d| d.finish == crate::serving::lm::generate::Finish::Cancelled);
        match outcome {
            Outcome::Ok if cancelled => st.cancelled += 1,
            Outcome::Ok => st.ok += 1,
            Outcome::BadInput => st.bad_input += 1,
            Outcome::Error | Outcome::Panic => st.errors += 1,
        }
        if let Some(d) = done {
            st.prompt_tokens += d.prompt_tokens as u64;
            st.completion_tokens += d.completion_tokens as u64;
            st.ttft_sum += d.time_to_first_token.as_secs_f64();
            // The first token comes with the prompt; the others are decode steps.
            st.decode_tokens += d.completion_tokens.saturating_sub(1) as u64;
            st.decode_seconds += d.decode.as_secs_f64();
        }
    }

    /// Chunks stored per source peer.
    pub fn chunks_by_peer(&self) -> BTreeMap<String, u64> {
        self.chunks_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Render the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let g = |s: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut s,
            "pollen_peers",
            "Connected peers.",
            "gauge",
            self.peers.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP pollen_bytes_received_total Bytes received from peers, by peer class."
        );
        let _ = writeln!(s, "# TYPE pollen_bytes_received_total counter");
        for (c, v) in [
            (PeerClass::SameSite, &self.bytes_in_same),
            (PeerClass::Other, &self.bytes_in_other),
        ] {
            let _ = writeln!(
                s,
                "pollen_bytes_received_total{{class=\"{}\"}} {}",
                c.label(),
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP pollen_bytes_sent_total Bytes sent to peers, by peer class."
        );
        let _ = writeln!(s, "# TYPE pollen_bytes_sent_total counter");
        for (c, v) in [
            (PeerClass::SameSite, &self.bytes_out_same),
            (PeerClass::Other, &self.bytes_out_other),
        ] {
            let _ = writeln!(
                s,
                "pollen_bytes_sent_total{{class=\"{}\"}} {}",
                c.label(),
                v.load(Ordering::Relaxed)
            );
        }
        g(
            &mut s,
            "pollen_chunks_verified_total",
            "Chunks verified and stored.",
            "counter",
            self.chunks_verified.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_chunks_failed_total",
            "Chunks that failed verification.",
            "counter",
            self.chunks_failed.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_chunks_duplicate_total",
            "Chunks received that were already held.",
            "counter",
            self.chunks_duplicate.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_chunks_uploaded_total",
            "Chunks sent to peers.",
            "counter",
            self.chunks_uploaded.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_chunk_requests_busy_total",
            "Chunk requests answered Busy: every upload taken and queued_uploads waiting.",
            "counter",
            self.chunks_busy.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_chunks_unsolicited_total",
            "Chunk frames dropped: no request of ours to that peer had their id.",
            "counter",
            self.chunks_unsolicited.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_relayed_connections_total",
            "Connections established through a relay (/p2p-circuit).",
            "counter",
            self.relayed_connections.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_moved_off_relay_total",
            "Peers whose pollen streams moved from a relayed connection to a direct one.",
            "counter",
            self.moved_off_relay.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_peer_penalties_total",
            "Penalties given to peers (timeouts, bad frames, corrupt chunks).",
            "counter",
            self.peer_penalties.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_peers_banned_total",
            "Peers disconnected and refused for misconduct.",
            "counter",
            self.peers_banned.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_peer_streams_refused_total",
            "Inbound pollen streams closed at once: the peer had as many as it may.",
            "counter",
            self.streams_refused.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_peer_streams_timed_out_total",
            "Inbound pollen streams closed because a Hello or a frame was late.",
            "counter",
            self.streams_timed_out.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_control_frames_dropped_total",
            "Control frames to peers dropped: the peer's queue was full.",
            "counter",
            self.control_dropped.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_manifests_accepted_total",
            "Manifests accepted.",
            "counter",
            self.manifests_accepted.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "pollen_store_errors_total",
            "Store errors (disk full, IO).",
            "counter",
            self.store_errors.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP pollen_rejected_total Objects rejected, by kind and reason."
        );
        let _ = writeln!(s, "# TYPE pollen_rejected_total counter");
        for ((kind, reason), v) in self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "pollen_rejected_total{{kind=\"{kind}\",reason=\"{reason}\"}} {v}"
            );
        }
        let inf = self
            .inference
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let _ = writeln!(
            s,
            "# HELP pollen_inference_requests_total Inference requests, by model and version."
        );
        let _ = writeln!(s, "# TYPE pollen_inference_requests_total counter");
        for ((m, v), st) in &inf {
            let _ = writeln!(
                s,
                "pollen_inference_requests_total{{model=\"{m}\",version=\"{v}\"}} {}",
                st.requests
            );
        }
        let _ = writeln!(
            s,
            "# HELP pollen_inference_errors_total Failed inference requests, by model and version."
        );
        let _ = writeln!(s, "# TYPE pollen_inference_errors_total counter");
        for ((m, v), st) in &inf {
            let _ = writeln!(
                s,
                "pollen_inference_errors_total{{model=\"{m}\",version=\"{v}\"}} {}",
                st.errors
            );
        }
        let _ = writeln!(
            s,
            "# HELP pollen_inference_latency_seconds Inference latency, by model and version."
        );
        let _ = writeln!(s, "# TYPE pollen_inference_latency_seconds histogram");
        for ((m, v), st) in &inf {
            for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "pollen_inference_latency_seconds_bucket{{model=\"{m}\",version=\"{v}\",le=\"{le}\"}} {}",
                    st.buckets[i]
                );
            }
            let _ = writeln!(
                s,
                "pollen_inference_latency_seconds_bucket{{model=\"{m}\",version=\"{v}\",le=\"+Inf\"}} {}",
                st.requests
            );
            let _ = writeln!(
                s,
                "pollen_inference_latency_seconds_sum{{model=\"{m}\",version=\"{v}\"}} {}",
                st.sum
            );
            let _ = writeln!(
                s,
                "pollen_inference_latency_seconds_count{{model=\"{m}\",version=\"{v}\"}} {}",
                st.requests
            );
        }
        let gens = self
            .generations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        type Field = fn(&GenStats) -> String;
        let families: [(&str, &str, &str, Field); 7] = [
            (
                "pollen_lm_generations_total",
                "counter",
                "Language-model generations, by model, version and outcome (ok, cancelled, error, bad_input).",
                |_| String::new(),
            ),
            (
                "pollen_lm_prompt_tokens_total",
                "counter",
                "Prompt tokens of generations that ran.",
                |g| g.prompt_tokens.to_string(),
            ),
            (
                "pollen_lm_completion_tokens_total",
                "counter",
                "Tokens generated.",
                |g| g.completion_tokens.to_string(),
            ),
            (
                "pollen_lm_time_to_first_token_seconds_sum",
                "counter",
                "Sum of the times from a request's start to its first token.",
                |g| g.ttft_sum.to_string(),
            ),
            (
                "pollen_lm_decode_seconds_total",
                "counter",
                "Time spent generating tokens after the first.",
                |g| g.decode_seconds.to_string(),
            ),
            (
                "pollen_lm_decode_tokens_total",
                "counter",
                "Tokens generated after the first (decode steps).",
                |g| g.decode_tokens.to_string(),
            ),
            (
                "pollen_lm_decode_tokens_per_second",
                "gauge",
                "Decode speed over every generation so far.",
                |g| {
                    if g.decode_seconds > 0.0 {
                        (g.decode_tokens as f64 / g.decode_seconds).to_string()
                    } else {
                        "0".into()
                    }
                },
            ),
        ];
        for (name, kind, help, field) in families {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((m, v), st) in &gens {
                if name == "pollen_lm_generations_total" {
                    for (outcome, n) in [
                        ("ok", st.ok),
                        ("cancelled", st.cancelled),
                        ("error", st.errors),
                        ("bad_input", st.bad_input),
                    ] {
                        let _ = writeln!(
                            s,
                            "{name}{{model=\"{m}\",version=\"{v}\",outcome=\"{outcome}\"}} {n}"
                        );
                    }
                } else {
                    let _ = writeln!(s, "{name}{{model=\"{m}\",version=\"{v}\"}} {}", field(st));
                }
            }
        }
        let _ = writeln!(
            s,
            "# HELP pollen_chunks_received_total Chunks stored, by the peer that sent them."
        );
        let _ = writeln!(s, "# TYPE pollen_chunks_received_total counter");
        for (peer, v) in self.chunks_by_peer() {
            let _ = writeln!(s, "pollen_chunks_received_total{{peer=\"{peer}\"}} {v}");
        }
        s
    }
}

/// Metrics of the loaded models prepared per input shape (see
/// [`crate::serving::shapes`]): `pollen_model_specialisations_total` (preparations
/// started, failed ones included) and `pollen_model_specialisations_cached` (prepared
/// shapes held), by model and version. Models that serve every shape with one runnable
/// have no lines.
pub fn render_specialisations(models: &[std::sync::Arc<crate::serving::LoadedModel>]) -> String {
    let mut s = String::new();
    let per_shape: Vec<_> = models
        .iter()
        .filter_map(|m| m.specialisations().map(|sp| (m, sp)))
        .collect();
    let _ = writeln!(
        s,
        "# HELP pollen_model_specialisations_total Input shapes a model was prepared for \
         (models tract cannot optimise with symbolic dimensions)."
    );
    let _ = writeln!(s, "# TYPE pollen_model_specialisations_total counter");
    for (m, (made, _)) in &per_shape {
        let _ = writeln!(
            s,
            "pollen_model_specialisations_total{{model=\"{}\",version=\"{}\"}} {made}",
            m.channel, m.version
        );
    }
    let _ = writeln!(
        s,
        "# HELP pollen_model_specialisations_cached Prepared input shapes a model holds."
    );
    let _ = writeln!(s, "# TYPE pollen_model_specialisations_cached gauge");
    for (m, (_, cached)) in &per_shape {
        let _ = writeln!(
            s,
            "pollen_model_specialisations_cached{{model=\"{}\",version=\"{}\"}} {cached}",
            m.channel, m.version
        );
    }
    s
}
