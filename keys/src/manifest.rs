//! Manifests: hashing files, building and signing a manifest, co-signing, a readable view.
//!
//! Files are streamed through [`FileHasher`] in reads of [`READ_LEN`] bytes, never loaded
//! whole, so a multi-GiB model costs 1 MiB of memory.

use crate::keyfile::public_key;
use crate::time::{format_duration, format_unix};
use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use pollen_protocol::chunking::{ChunkSize, FileHasher, FileSpec};
use pollen_protocol::manifest::{
    Artifact, Channel, DeviceRequirements, FileEntry, Manifest, ManifestBody, ModelMeta,
    SignedManifest, Variant,
};
use pollen_protocol::rollout::{Gate, PPM, RolloutPlan, StageStart};
use pollen_protocol::signing::{Signed, SignedBody};
use pollen_protocol::trust::TrustRoot;
use pollen_protocol::{ManifestId, UnixTime};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes read from a file at a time while hashing it.
pub const READ_LEN: usize = 1024 * 1024;

/// Name of the one variant [`build_body`] makes.
pub const DEFAULT_VARIANT: &str = "default";

/// Hash the file at `path` cut at `chunk_size`: content id (BLAKE3 of the whole file),
/// size and chaining values. Reads [`READ_LEN`] bytes at a time.
pub fn hash_file(path: &Path, chunk_size: ChunkSize) -> Result<FileSpec> {
    hash_file_with_progress(path, chunk_size, &mut |_| {})
}

/// [`hash_file`], calling `progress` with the bytes hashed so far after each read.
pub fn hash_file_with_progress(
    path: &Path,
    chunk_size: ChunkSize,
    progress: &mut dyn FnMut(u64),
) -> Result<FileSpec> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = FileHasher::new(chunk_size);
    let mut buf = vec![0u8; READ_LEN];
    let mut done = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                done += n as u64;
                progress(done);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(hasher.finish())
}

/// Parse a size: a whole number with an optional unit `B`, `KiB`, `MiB` or `GiB` (also
/// `K`, `M`, `G`, all powers of 1024), e.g. `1MiB`, `64KiB`, `65536`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size such as 1MiB or 65536"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => bail!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB or GiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

/// Parse a chunk size (see [`parse_size`]): a power of two from 16 KiB to 16 MiB.
pub fn parse_chunk_size(s: &str) -> Result<ChunkSize> {
    let bytes = parse_size(s)?;
    ChunkSize::new(bytes).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Parse a percentage: a number above 0 and at most 100, with or without `%`.
pub fn parse_percent(s: &str) -> Result<f64> {
    let t = s.trim();
    let num = t.strip_suffix('%').unwrap_or(t).trim();
    let p: f64 = num
        .parse()
        .ok()
        .filter(|p: &f64| p.is_finite())
        .with_context(|| format!("{s:?} is not a percentage such as 5%"))?;
    if !(0.0..=100.0).contains(&p) {
        bail!("percentage {s:?} is not between 0% and 100%");
    }
    Ok(p)
}

/// A percentage (see [`parse_percent`]) in parts per million.
pub fn parse_ppm(s: &str) -> Result<u32> {
    let p = parse_percent(s)?;
    // p is within [0, 100], so the product is within [0, PPM].
    Ok((p / 100.0 * f64::from(PPM)).round() as u32)
}

/// Build a rollout plan from stage shares such as `5%,25%,100%`: stage `i > 0` opens
/// `interval` after stage `i - 1`, and every stage but the last carries `gate`. Shares are
/// cumulative and must strictly increase.
pub fn parse_stages(stages: &str, interval: Duration, gate: Option<Gate>) -> Result<RolloutPlan> {
    let shares = stages
        .split(',')
        .map(|s| {
            let p = parse_percent(s)?;
            if p == 0.0 {
                bail!("stage share {s:?} must be above 0%");
            }
            Ok(p)
        })
        .collect::<Result<Vec<f64>>>()?;
    let plan = RolloutPlan::percent(&shares, interval, gate);
    plan.validate()
        .map_err(|e| anyhow::anyhow!("rollout stages {stages:?}: {e}"))?;
    Ok(plan)
}

/// What [`build_body`] needs to make a manifest body.
#[derive(Clone, Debug)]
pub struct NewManifest {
    /// Channel of the release.
    pub channel: Channel,
    /// Version, at least 1 and above every version already published on the channel.
    pub version: u64,
    /// Files of the one variant, the model graph first; each is named by its file name.
    pub files: Vec<PathBuf>,
    /// Chunk size for every file.
    pub chunk_size: ChunkSize,
    /// Rollout plan.
    pub rollout: RolloutPlan,
    /// Creation time (stage timing is anchored here).
    pub created: UnixTime,
    /// Expiry.
    pub expires: UnixTime,
    /// The manifest this one replaces.
    pub replaces: Option<ManifestId>,
}

/// Hash every file and build the manifest body: one variant named [`DEFAULT_VARIANT`]
/// with no device requirements, files named by their file names (not paths), empty model
/// metadata and no golden checks ([`crate::golden::attach`] adds them). Errors when a file
/// cannot be read, a name is not UTF-8 or is the reserved
/// [`GOLDEN_FILE`](pollen_protocol::manifest::GOLDEN_FILE), or the body breaks a field
/// rule (duplicate names, too many files, …).
pub fn build_body(spec: &NewManifest) -> Result<ManifestBody> {
    build_body_with_progress(spec, &mut |_, _| {})
}

/// [`build_body`], calling `progress(file, bytes hashed)` while hashing each file.
pub fn build_body_with_progress(
    spec: &NewManifest,
    progress: &mut dyn FnMut(&Path, u64),
) -> Result<ManifestBody> {
    if spec.files.is_empty() {
        bail!("a manifest needs at least one file");
    }
    let variant = hash_variant(
        DEFAULT_VARIANT,
        &spec.files,
        DeviceRequirements::default(),
        spec.chunk_size,
        progress,
    )?;
    let body = ManifestBody {
        channel: spec.channel.clone(),
        version: spec.version,
        artifact: Artifact {
            variants: vec![variant],
        },
        model: ModelMeta::default(),
        golden: Vec::new(),
        rollout: spec.rollout.clone(),
        created: spec.created,
        expires: spec.expires,
        replaces: spec.replaces,
        serving: None,
    };
    body.validate()
        .map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    Ok(body)
}

/// Hash the files of a variant (the model graph first; each named by its file name).
/// Errors when a file cannot be read, or a name is not UTF-8 or is the reserved
/// [`GOLDEN_FILE`](pollen_protocol::manifest::GOLDEN_FILE).
pub fn hash_variant(
    name: &str,
    paths: &[PathBuf],
    requires: DeviceRequirements,
    chunk_size: ChunkSize,
    progress: &mut dyn FnMut(&Path, u64),
) -> Result<Variant> {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no UTF-8 file name", path.display()))?
            .to_string();
        if name == pollen_protocol::manifest::GOLDEN_FILE {
            bail!(
                "{}: {name} is a reserved file name (golden checks go with --golden)",
                path.display()
            );
        }
        files.push(FileEntry {
            name,
            spec: hash_file_with_progress(path, chunk_size, &mut |n| progress(path, n))?,
        });
    }
    Ok(Variant {
        name: name.to_string(),
        requires,
        files,
    })
}

/// Sign `body` with every key at once and decode the result as a node would (canonical
/// encoding, field rules). Signatures are checked against a trust root by
/// [`check_against`].
pub fn sign(body: &ManifestBody, keys: &[&SigningKey]) -> Result<Manifest> {
    if keys.is_empty() {
        bail!("a manifest needs at least one signing key");
    }
    body.validate()
        .map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let signed = Signed::sign(body, keys);
    signed.check_envelope().context("too many signing keys")?;
    Manifest::decode(signed).context("the signed manifest does not decode")
}

/// Add `key`'s signature to a manifest in place (offline co-signing for thresholds above
/// one). Signing twice with one key replaces its signature. On error `signed` is unchanged.
pub fn add_signature(signed: &mut SignedManifest, key: &SigningKey) -> Result<()> {
    let mut next = signed.clone();
    next.add_signature(key);
    next.check_envelope()
        .context("cannot add another signature")?;
    *signed = next;
    Ok(())
}

/// Check a manifest against a trust root as a node would at `now` (signatures, scope,
/// threshold, expiry; not the version order, which only a node knows).
pub fn check_against(m: &Manifest, trust: &TrustRoot, now: UnixTime) -> Result<()> {
    trust
        .authorise_manifest(m, now)
        .map_err(|e| anyhow::anyhow!("trust root version {}: {e}", trust.body.version))
}

/// The keys that signed `m` validly (whatever their authority).
pub fn valid_signers(m: &Manifest) -> Vec<pollen_protocol::PublicKey> {
    m.signed.valid_signers(|_| true)
}

/// Is `key` among the valid signers of `m`?
pub fn signed_by(m: &Manifest, key: &SigningKey) -> bool {
    valid_signers(m).contains(&public_key(key))
}

/// A human-readable description of a manifest: id, channel, version, times, files, plan,
/// signatures and, with `trust`, whether a node holding that root accepts it at `now`.
pub fn describe(m: &Manifest, now: UnixTime, trust: Option<&TrustRoot>) -> String {
    let b = &m.body;
    let mut s = String::new();
    let _ = writeln!(s, "manifest {}", m.id);
    let _ = writeln!(s, "  channel:  {}", b.channel);
    let _ = writeln!(s, "  version:  {}", b.version);
    let _ = writeln!(s, "  created:  {}", format_unix(b.created));
    let state = if b.expires <= now { "EXPIRED" } else { "valid" };
    let _ = writeln!(s, "  expires:  {} ({state})", format_unix(b.expires));
    if let Some(r) = b.replaces {
        let _ = writeln!(s, "  replaces: {r}");
    }
    for v in &b.artifact.variants {
        let _ = writeln!(s, "  variant {}:", v.name);
        for f in &v.files {
            let chunks = f.spec.chunk_count();
            let _ = writeln!(
                s,
                "    {}  {} bytes  content id {}  {chunks} chunk{} of {}",
                f.name,
                f.spec.size,
                f.spec.content_id,
                if chunks == 1 { "" } else { "s" },
                format_size(f.spec.chunk_size.bytes())
            );
        }
    }
    if !b.golden.is_empty() {
        let _ = writeln!(
            s,
            "  golden checks: {} in the manifest, absolute tolerances {:?}",
            b.golden.len(),
            b.golden.iter().map(|g| g.tolerance).collect::<Vec<_>>()
        );
    }
    for v in &b.artifact.variants {
        if let Some(f) = v.golden_file() {
            let _ = writeln!(
                s,
                "  golden checks of variant {}: in its file {} ({} bytes)",
                v.name, f.name, f.spec.size
            );
        }
    }
    if let Some(sv) = b.serving.as_ref().filter(|sv| !sv.golden_rtol.is_empty()) {
        let _ = writeln!(
            s,
            "  golden relative tolerances (per check): {:?}",
            sv.golden_rtol
        );
    }
    let _ = writeln!(s, "  rollout ({} stages):", b.rollout.stages.len());
    for (i, st) in b.rollout.stages.iter().enumerate() {
        let start = match st.start {
            StageStart::Immediately if i == 0 => "at creation".to_string(),
            StageStart::Immediately => "with the previous stage".to_string(),
            StageStart::At(t) => format!("at {}", format_unix(t)),
            StageStart::AfterPreviousMs(ms) if i == 0 => {
                format!(
                    "{} after creation",
                    format_duration(Duration::from_millis(ms))
                )
            }
            StageStart::AfterPreviousMs(ms) => format!(
                "{} after the previous stage",
                format_duration(Duration::from_millis(ms))
            ),
        };
        let gate = match st.gate {
            Some(g) => format!(
                ", gate: {} healthy, at most {} failures",
                g.min_healthy,
                format_ppm(g.max_failure_ppm)
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "    {}. {} of nodes, {start}{gate}",
            i + 1,
            format_ppm(st.share_ppm)
        );
    }
    if let Some(l) = b.rollout.runtime {
        let _ = writeln!(
            s,
            "  runtime limit: at most {} failed inferences per health window of at least {} requests",
            format_ppm(l.max_error_ppm),
            l.min_requests
        );
    }
    let valid = valid_signers(m);
    let _ = writeln!(s, "  signatures ({}):", m.signed.signatures().len());
    for e in m.signed.signatures() {
        let verdict = match (valid.contains(&e.key), trust) {
            (false, _) => "INVALID signature",
            (true, None) => "valid",
            (true, Some(t)) if t.may_sign(&e.key, &b.channel) => {
                "valid, authorised for this channel"
            }
            (true, Some(_)) => "valid, but NOT authorised for this channel",
        };
        let _ = writeln!(s, "    {}  {verdict}", e.key);
    }
    if let Some(t) = trust {
        let line = match check_against(m, t, now) {
            Ok(()) => "yes".to_string(),
            Err(e) => format!("NO ({e})"),
        };
        let _ = writeln!(
            s,
            "  accepted under trust root version {}: {line}",
            t.body.version
        );
    }
    s
}

/// Parts per million as a percentage without needless decimals: `5%`, `12.5%`.
pub fn format_ppm(ppm: u32) -> String {
    let whole = ppm / (PPM / 100);
    let frac = ppm % (PPM / 100);
    if frac == 0 {
        format!("{whole}%")
    } else {
        let f = format!("{frac:04}");
        format!("{whole}.{}%", f.trim_end_matches('0'))
    }
}

/// Bytes for humans, in the largest binary unit that divides them.
fn format_size(bytes: u64) -> String {
    for (unit, len) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= len && bytes.is_multiple_of(len) {
            return format!("{} {unit}", bytes / len);
        }
    }
    format!("{bytes} B")
}

/// Read golden checks from a JSON file of the form
/// `{"input_name": "input", "output_name": "probabilities", "inputs": [[f32...], ...],
/// "expected": [[f32...], ...], "tolerance": 1e-4}`: one check per row, each a batch of one
/// (shapes `[1, len]`), FP32.
pub fn golden_from_json(path: &Path) -> Result<Vec<pollen_protocol::manifest::GoldenCheck>> {
    use pollen_protocol::manifest::{DType, GoldenCheck, TensorData};
    #[derive(serde::Deserialize)]
    struct Golden {
        input_name: String,
        output_name: String,
        inputs: Vec<Vec<f32>>,
        expected: Vec<Vec<f32>>,
        tolerance: f32,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let g: Golden = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a golden-check file", path.display()))?;
    if g.inputs.len() != g.expected.len() {
        bail!(
            "{}: {} inputs but {} expected outputs",
            path.display(),
            g.inputs.len(),
            g.expected.len()
        );
    }
    let tensor = |name: &str, row: &[f32]| TensorData {
        name: name.to_string(),
        dtype: DType::F32,
        shape: vec![1, row.len() as u64],
        data: row.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    Ok(g.inputs
        .iter()
        .zip(&g.expected)
        .map(|(i, e)| GoldenCheck {
            inputs: vec![tensor(&g.input_name, i)],
            expected: vec![tensor(&g.output_name, e)],
            tolerance: g.tolerance,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentages() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert!(parse_size("1TiB").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_chunk_size("1MiB").unwrap(), ChunkSize::DEFAULT);
        let err = parse_chunk_size("1000").unwrap_err().to_string();
        assert!(err.contains("power of two"), "{err}");
        assert_eq!(parse_ppm("5%").unwrap(), 50_000);
        assert_eq!(parse_ppm("12.5").unwrap(), 125_000);
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("NaN").is_err());
        assert!(parse_percent("x%").is_err());
        assert_eq!(format_ppm(125_000), "12.5%");
        assert_eq!(format_ppm(PPM), "100%");
        assert_eq!(format_ppm(1), "0.0001%");
        assert_eq!(format_size(1 << 20), "1 MiB");
        assert_eq!(format_size(5), "5 B");
    }

    #[test]
    fn stages() {
        let gate = Gate {
            min_healthy: 3,
            max_failure_ppm: 100_000,
        };
        let plan = parse_stages("5%,25%,100%", Duration::from_secs(60), Some(gate)).unwrap();
        let shares: Vec<u32> = plan.stages.iter().map(|s| s.share_ppm).collect();
        assert_eq!(shares, [50_000, 250_000, PPM]);
        assert_eq!(plan.stages[0].start, StageStart::Immediately);
        assert_eq!(plan.stages[1].start, StageStart::AfterPreviousMs(60_000));
        assert_eq!(plan.stages[0].gate, Some(gate));
        assert_eq!(plan.stages[2].gate, None);
        assert_eq!(
            parse_stages("100%", Duration::ZERO, None).unwrap(),
            RolloutPlan::immediate()
        );
        for bad in ["", "0%", "25%,5%", "5%,5%", "5%,,100%", "150%"] {
            assert!(
                parse_stages(bad, Duration::ZERO, None).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
