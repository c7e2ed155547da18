//! What `pollen publish`, `pollen keys manifest create` and `pollen rollout rollback` share:
//! the release arguments, building and signing a release from files, and loading keys.

use anyhow::{Context, Result, bail};
use pollen_keys::files::read_signed;
use pollen_keys::golden;
use pollen_keys::load_key_file;
use pollen_keys::manifest::{self as mf, NewManifest};
use pollen_keys::time::{days, parse_duration};
use pollen_node::serving::lm::config::{GOLDEN_PROMPTS_FILE, GoldenPromptsFile};
use pollen_node::serving::onnx;
use pollen_protocol::manifest::{
    Channel, DeviceRequirements, GoldenPrompt, InputFact, LM_CONFIG_FILE, LM_TOKENIZER_FILE,
    LmSpec, Manifest, ManifestBody, ServingSpec,
};
use pollen_protocol::rollout::Gate;
use pollen_protocol::{ManifestId, SigningKey, UnixTime};
use std::path::{Path, PathBuf};

/// What a release is made of: files, channel, version, keys and rollout plan (shared by
/// `pollen keys manifest create` and `pollen publish`).
#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    /// The files of the release, model graph first; each is named by its file name.
    #[arg(required_unless_present_any = ["lm", "variants"], value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// A language model, served on the OpenAI-compatible API: DIR holds `model.onnx`
    /// (with past/present key-value tensors), `tokenizer.json`, `generation.json` and
    /// `golden_prompts.json` (the same as `--variant default=DIR`).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["files", "variants"])]
    pub lm: Option<PathBuf>,
    /// A variant of the release from a directory (repeatable; the first is the default):
    /// a language model's files as for `--lm`, or `model.onnx` and the files beside it.
    /// Nodes choose the variant whose `--requires` names their device class, else the
    /// first whose requirements they meet.
    #[arg(long = "variant", value_name = "NAME=DIR", conflicts_with = "files")]
    pub variants: Vec<String>,
    /// What a device must offer to run a variant (repeatable):
    /// NAME:class=C1+C2,memory=MIB,cpu=F1+F2, e.g. int8:class=weak or fp32:memory=2048.
    #[arg(long = "requires", value_name = "NAME:REQS", requires = "variants")]
    pub requires: Vec<String>,
    /// Channel (lowercase letters, digits, '.', '_', '-').
    #[arg(long, value_name = "C")]
    pub channel: String,
    /// Version: at least 1, above every version already published on the channel.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub version: u64,
    /// Publisher secret key file(s) to sign with.
    #[arg(long, value_name = "KEYFILE", required = true, num_args = 1..)]
    pub key: Vec<PathBuf>,
    /// Cumulative stage shares of nodes.
    #[arg(long, value_name = "5%,25%,100%", default_value = "100%")]
    pub stages: String,
    /// Time between the opening of one stage and the next (ms, s, m, h, d).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub stage_interval: String,
    /// Health gate on every stage but the last: healthy reports needed to go on.
    #[arg(long, value_name = "N", requires = "gate_max_failure")]
    pub gate_min_healthy: Option<u32>,
    /// Health gate: largest failure rate tolerated (e.g. 10%).
    #[arg(long, value_name = "PERCENT", requires = "gate_min_healthy")]
    pub gate_max_failure: Option<String>,
    /// Runtime limit: a node whose inference error rate over a health window exceeds this
    /// (e.g. 5%) reports the release as failed, which counts against the stage gates.
    #[arg(long, value_name = "PERCENT")]
    pub max_error_rate: Option<String>,
    /// Runtime limit: fewer requests than this in a window prove nothing.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        requires = "max_error_rate"
    )]
    pub min_requests: u32,
    /// Chunk size: a power of two from 16KiB to 16MiB.
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    pub chunk_size: String,
    /// Days until nodes that have not accepted the manifest refuse it.
    #[arg(long, value_name = "D", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub expires_days: u64,
    /// The manifest file this release replaces.
    #[arg(long, value_name = "FILE")]
    pub replaces: Option<PathBuf>,
    /// Golden checks every node runs before it serves the release: a directory in the
    /// ONNX test-data layout (`test_data_set_N/` holding `input_K.pb` and `output_K.pb`,
    /// serialised TensorProtos; or one such data set), or a JSON file (input_name,
    /// output_name, inputs, expected, tolerance). Checks too large for the manifest travel
    /// as a file of the release, `golden.checks`.
    #[arg(long, value_name = "DIR|FILE")]
    pub golden: Option<PathBuf>,
    /// Absolute tolerance of float outputs, for a golden directory (a JSON file states its
    /// own) [default: 1e-4].
    #[arg(long, value_name = "X", requires = "golden")]
    pub golden_atol: Option<f32>,
    /// Relative tolerance of float outputs: an element passes when |got - want| <= atol +
    /// rtol * |want| (integers and booleans must match exactly) [default: 1e-3 for a
    /// golden directory, 0 for a JSON file].
    #[arg(long, value_name = "Y", requires = "golden")]
    pub golden_rtol: Option<f32>,
    /// Declare an input of the model (repeatable), applied before tract analyses it:
    /// NAME=DTYPE[DIMS], each dimension a number, a symbol (dimensions of the same name
    /// take the same size) or ? (any size), e.g. x=f32[1,3,H,W] or input=f32[?,576].
    #[arg(long = "input", value_name = "NAME=DTYPE[DIMS]")]
    pub inputs: Vec<String>,
    /// Fix an input of one element for this deployment (repeatable), e.g. sr=16000: the
    /// value is read as the input's type in the model, nodes fold it into the model (an
    /// `If` on it is decided once), and requests leave it out.
    #[arg(long = "const", value_name = "NAME=VALUE")]
    pub consts: Vec<String>,
}

/// The serving spec of `--input` and `--const`, checked against the model graph (the
/// first file of the first variant); `None` when neither is given.
fn serving_spec(a: &ReleaseArgs, variants: &[VariantDir]) -> Result<Option<ServingSpec>> {
    if a.inputs.is_empty() && a.consts.is_empty() {
        return Ok(None);
    }
    let model = variants
        .first()
        .and_then(|v| v.files.first())
        .context("no model file")?;
    let bytes = std::fs::read(model).with_context(|| format!("cannot read {}", model.display()))?;
    let graph = onnx::parse_graph(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (--input and --const need an ONNX model first)",
            model.display()
        )
    })?;
    let mut spec = ServingSpec::default();
    for d in &a.inputs {
        let fact: InputFact = d.parse().map_err(|e| anyhow::anyhow!("--input {e}"))?;
        onnx::check_declared(&graph, &fact).map_err(|e| anyhow::anyhow!(e))?;
        if spec.inputs.iter().any(|f| f.name == fact.name) {
            bail!("--input {}: declared twice", fact.name);
        }
        spec.inputs.push(fact);
    }
    for c in &a.consts {
        let t = onnx::declare_const(&graph, c).map_err(|e| anyhow::anyhow!(e))?;
        if spec.inputs.iter().any(|f| f.name == t.name) {
            bail!("input {} is given both with --input and --const", t.name);
        }
        if spec.consts.iter().any(|f| f.name == t.name) {
            bail!("--const {}: given twice", t.name);
        }
        spec.consts.push(t);
    }
    Ok(Some(spec))
}

/// A built release: the signed manifest and, when its golden checks travel as a file,
/// that file's bytes (uploaded with the other files).
#[derive(Debug)]
pub struct Release {
    /// The signed manifest.
    pub manifest: Manifest,
    /// The golden file ([`pollen_protocol::manifest::GOLDEN_FILE`]), if any.
    pub golden_file: Option<Vec<u8>>,
    /// Every variant's files on disk with their content ids, each content once.
    pub files: Vec<(PathBuf, pollen_protocol::ContentId)>,
}

/// A variant as the command line gives it.
#[derive(Debug)]
struct VariantDir {
    name: String,
    files: Vec<PathBuf>,
    requires: DeviceRequirements,
    /// `golden_prompts.json` of a language model's directory.
    golden_prompts: Option<PathBuf>,
    lm: bool,
}

/// The variants of a release: the positional files as `default`, `--lm DIR`, or each
/// `--variant NAME=DIR` with its `--requires`.
fn variant_dirs(a: &ReleaseArgs) -> Result<Vec<VariantDir>> {
    if !a.files.is_empty() {
        return Ok(vec![VariantDir {
            name: mf::DEFAULT_VARIANT.into(),
            files: a.files.clone(),
            requires: DeviceRequirements::default(),
            golden_prompts: None,
            lm: false,
        }]);
    }
    let given: Vec<(String, PathBuf)> = match &a.lm {
        Some(dir) => vec![(mf::DEFAULT_VARIANT.to_string(), dir.clone())],
        None => a
            .variants
            .iter()
            .map(|v| {
                let (name, dir) = v
                    .split_once('=')
                    .with_context(|| format!("--variant {v}: expected NAME=DIR"))?;
                Ok((name.to_string(), PathBuf::from(dir)))
            })
            .collect::<Result<_>>()?,
    };
    let mut out: Vec<VariantDir> = Vec::new();
    for (name, dir) in given {
        if out.iter().any(|v| v.name == name) {
            bail!("variant {name} given twice");
        }
        let model = dir.join("model.onnx");
        if !model.is_file() {
            bail!("{}: no model.onnx", dir.display());
        }
        let lm = dir.join(LM_CONFIG_FILE).is_file();
        if a.lm.is_some() && !lm {
            bail!(
                "{}: no {LM_CONFIG_FILE}: not a language model",
                dir.display()
            );
        }
        let mut files = vec![model];
        if lm {
            for f in [LM_TOKENIZER_FILE, LM_CONFIG_FILE] {
                let p = dir.join(f);
                if !p.is_file() {
                    bail!("{}: a language model needs {f}", dir.display());
                }
                files.push(p);
            }
        } else {
            let mut rest: Vec<PathBuf> = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "model.onnx"))
                .collect();
            rest.sort();
            files.extend(rest);
        }
        let prompts = dir.join(GOLDEN_PROMPTS_FILE);
        out.push(VariantDir {
            name,
            files,
            requires: DeviceRequirements::default(),
            golden_prompts: (lm && prompts.is_file()).then_some(prompts),
            lm,
        });
    }
    if out.iter().any(|v| v.lm) && !out.iter().all(|v| v.lm) {
        bail!("either every variant is a language model (has {LM_CONFIG_FILE}) or none is");
    }
    for r in &a.requires {
        let (name, reqs) = r
            .split_once(':')
            .with_context(|| format!("--requires {r}: expected NAME:REQS"))?;
        let v = out
            .iter_mut()
            .find(|v| v.name == name)
            .with_context(|| format!("--requires {r}: no variant {name}"))?;
        v.requires = parse_requires(reqs).with_context(|| format!("--requires {r}"))?;
    }
    Ok(out)
}

/// Bytes `build_release` hashes (for a progress bar); 0 for what cannot be read.
pub fn hashed_bytes(a: &ReleaseArgs) -> u64 {
    variant_dirs(a)
        .map(|ds| {
            ds.iter()
                .flat_map(|d| &d.files)
                .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// `class=C1+C2,memory=MIB,cpu=F1+F2` (any of the three).
fn parse_requires(s: &str) -> Result<DeviceRequirements> {
    let mut r = DeviceRequirements::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("{part}: expected KEY=VALUE"))?;
        let list = || v.split('+').map(str::to_string).collect::<Vec<_>>();
        match k {
            "class" => r.device_classes = list(),
            "memory" => r.min_memory_mib = v.parse().with_context(|| format!("memory={v}"))?,
            "cpu" => r.cpu_features = list(),
            _ => bail!("{k}: the requirements are class, memory and cpu"),
        }
    }
    Ok(r)
}

/// The language-model spec of the variants' golden prompts: one set of prompts for the
/// release (every variant that has the file must have the same prompts), one bound per
/// variant.
fn lm_spec(variants: &[VariantDir]) -> Result<LmSpec> {
    let mut spec = LmSpec::default();
    let mut prompts: Option<Vec<GoldenPrompt>> = None;
    for v in variants {
        let Some(path) = &v.golden_prompts else {
            spec.min_agreement.push(0.0);
            continue;
        };
        let f = GoldenPromptsFile::read(path).map_err(anyhow::Error::msg)?;
        spec.min_agreement.push(f.min_agreement);
        match &prompts {
            None => prompts = Some(f.prompts),
            Some(p) if *p == f.prompts => {}
            Some(_) => bail!(
                "{}: its golden prompts differ from the first variant's (a release has one set; \
                 each variant states its own min_agreement)",
                path.display()
            ),
        }
    }
    let prompts = prompts.unwrap_or_default();
    if prompts.is_empty() {
        eprintln!("warning: no golden prompts: nodes will serve the language model unchecked");
    } else if variants.iter().any(|v| v.golden_prompts.is_none()) {
        bail!(
            "every variant of a language model with golden prompts needs its golden_prompts.json"
        );
    }
    spec.golden_prompts = prompts;
    Ok(spec)
}

/// Hash the files, read the golden checks, and build and sign the manifest of a release,
/// calling `progress(file, bytes hashed)` while hashing.
pub fn build_release(
    a: &ReleaseArgs,
    now: UnixTime,
    progress: &mut dyn FnMut(&Path, u64),
) -> Result<Release> {
    let channel = Channel::new(&a.channel).map_err(|e| anyhow::anyhow!("--channel: {e}"))?;
    let interval = parse_duration(&a.stage_interval).context("--stage-interval")?;
    let gate = match (a.gate_min_healthy, &a.gate_max_failure) {
        (Some(min_healthy), Some(max)) => Some(Gate {
            min_healthy,
            max_failure_ppm: mf::parse_ppm(max).context("--gate-max-failure")?,
        }),
        _ => None,
    };
    let mut rollout = mf::parse_stages(&a.stages, interval, gate).context("--stages")?;
    if let Some(rate) = &a.max_error_rate {
        rollout.runtime = Some(pollen_protocol::rollout::RuntimeLimit {
            max_error_ppm: mf::parse_ppm(rate).context("--max-error-rate")?,
            min_requests: a.min_requests,
        });
    }
    if rollout
        .stages
        .last()
        .is_some_and(|s| s.share_ppm < pollen_protocol::rollout::PPM)
    {
        eprintln!("warning: the last stage is below 100%: some nodes never get it");
    }
    let replaces = match &a.replaces {
        Some(p) => {
            let (signed, _) = read_signed::<ManifestBody>(p, "manifest")?;
            Some(ManifestId(signed.body_hash()))
        }
        None => None,
    };
    let keys = load_keys(&a.key)?;
    let dirs = variant_dirs(a)?;
    let serving = serving_spec(a, &dirs)?;
    let lm = match dirs.iter().any(|v| v.lm) {
        true => Some(lm_spec(&dirs)?),
        false => None,
    };
    let spec = NewManifest {
        channel,
        version: a.version,
        files: dirs[0].files.clone(),
        chunk_size: mf::parse_chunk_size(&a.chunk_size).context("--chunk-size")?,
        rollout,
        created: now,
        expires: now.plus(days(a.expires_days)),
        replaces,
    };
    let mut body = mf::build_body_with_progress(&spec, progress)?;
    body.artifact.variants[0].name = dirs[0].name.clone();
    body.artifact.variants[0].requires = dirs[0].requires.clone();
    for d in &dirs[1..] {
        let v = mf::hash_variant(
            &d.name,
            &d.files,
            d.requires.clone(),
            spec.chunk_size,
            progress,
        )?;
        body.artifact.variants.push(v);
    }
    let mut golden_file = None;
    if let Some(g) = &a.golden {
        let (checks, rtol) = if g.is_dir() {
            let atol = a.golden_atol.unwrap_or(golden::DEFAULT_ATOL);
            let checks = golden::golden_from_dir(g, &dirs[0].files[0], atol)
                .with_context(|| format!("--golden {}", g.display()))?;
            (checks, Some(a.golden_rtol.unwrap_or(golden::DEFAULT_RTOL)))
        } else {
            if a.golden_atol.is_some() {
                bail!(
                    "--golden-atol applies to a golden directory; a JSON file states its own tolerance"
                );
            }
            (mf::golden_from_json(g)?, a.golden_rtol)
        };
        golden_file = golden::attach(&mut body, checks, rtol).context("--golden")?;
    }
    if let Some(s) = serving {
        let into = body.serving.get_or_insert_with(ServingSpec::default);
        into.inputs = s.inputs;
        into.consts = s.consts;
    }
    if let Some(lm) = lm {
        body.serving.get_or_insert_with(ServingSpec::default).lm = Some(lm);
    }
    let mut files: Vec<(PathBuf, pollen_protocol::ContentId)> = Vec::new();
    for (d, v) in dirs.iter().zip(&body.artifact.variants) {
        for (path, f) in d.files.iter().zip(&v.files) {
            if !files.iter().any(|(_, c)| *c == f.spec.content_id) {
                files.push((path.clone(), f.spec.content_id));
            }
        }
    }
    let refs: Vec<&SigningKey> = keys.iter().collect();
    Ok(Release {
        manifest: mf::sign(&body, &refs)?,
        golden_file,
        files,
    })
}

/// Read signing keys from key files.
pub fn load_keys(paths: &[PathBuf]) -> Result<Vec<SigningKey>> {
    paths.iter().map(|p| load_key_file(p)).collect()
}
