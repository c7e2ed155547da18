//! `pollen keys …`: key files, trust roots, node certificates and manifest signing.
//!
//! A thin layer over the `pollen-keys` library: it parses arguments, reads the clock and
//! prints. Results go to standard output (the public key alone for `generate` and
//! `public`, so scripts can capture it); warnings go to standard error.
//!
//! Public keys (`--root`, `--publisher`, `--fleet-key`, `--node`) are 64 hex digits or a
//! path to a key file (secret, or public: 64 hex digits). Flags that take several values
//! (`--root`, `--publisher`, `--sign`, `--key`) may be repeated or given several values.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use pollen_keys::files::{read_signed, write_signed};
use pollen_keys::manifest::{self as mf};
use pollen_keys::time::{days, unix_now};
use pollen_keys::trust::{self, Completion};
use pollen_keys::{cert, generate_key_file, load_key_file, parse_public_key, public_key};
use pollen_protocol::manifest::{Manifest, ManifestBody};
use pollen_protocol::trust::{NodeCertBody, TrustRoot, TrustRootBody};
use pollen_protocol::{NodeId, SigningKey, UnixTime};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::release::{ReleaseArgs, build_release, load_keys};
/// `pollen keys`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a secret key file (mode 0600, never overwrites) and print its public key.
    Generate {
        /// Where to write the new key file.
        out: PathBuf,
    },
    /// Print the public key of a key file (64 hex digits).
    Public {
        /// A secret key file.
        keyfile: PathBuf,
    },
    /// Trust roots: create, rotate, co-sign, show.
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Certify a node key with the fleet key.
    Certify(CertifyArgs),
    /// Node certificates: show.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Manifests: create (hash files, sign), co-sign, show.
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TrustCommand {
    /// Create and sign a first trust root.
    Create(TrustCreateArgs),
    /// Create a new version of a trust root, signed by the threshold of its root keys.
    Rotate(TrustRotateArgs),
    /// Add signatures to a trust root file in place (offline multi-party signing).
    Sign {
        /// The trust root file to sign.
        file: PathBuf,
        /// Secret key file(s) to sign with.
        #[arg(long, value_name = "KEYFILE", required = true, num_args = 1..)]
        key: Vec<PathBuf>,
        /// The trust root FILE replaces, when FILE is a rotation.
        #[arg(long, value_name = "FILE")]
        current: Option<PathBuf>,
    },
    /// Show a trust root and whether it is signed to threshold.
    Show {
        /// The trust root file.
        file: PathBuf,
        /// Also check FILE as a rotation of this trust root.
        #[arg(long, value_name = "FILE")]
        current: Option<PathBuf>,
    },
}

/// Fields of a trust root body. On `rotate`, an omitted field keeps the current value
/// (but the version goes up by one and the expiry restarts from now).
#[derive(Debug, Args)]
struct TrustBodyArgs {
    /// A root key: signs trust roots. Repeat for several.
    #[arg(long = "root", value_name = "KEY", num_args = 1..)]
    roots: Vec<String>,
    /// Distinct root signatures a trust root needs [create: 1].
    #[arg(long, value_name = "N")]
    root_threshold: Option<u8>,
    /// A publisher key and the channels it may sign (`*`, `prefix.*` or a channel name).
    #[arg(long = "publisher", value_name = "KEY=PATTERN[,PATTERN...]", num_args = 1..)]
    publishers: Vec<String>,
    /// Distinct publisher signatures a manifest needs [create: 1].
    #[arg(long, value_name = "N")]
    publish_threshold: Option<u8>,
    /// Fleet key: nodes then need a certificate signed by it to join.
    #[arg(long, value_name = "KEY")]
    fleet_key: Option<String>,
    /// Version of the trust root [create: 1; rotate: current + 1].
    #[arg(long, value_name = "N")]
    version: Option<u64>,
    /// Days until the trust root expires.
    #[arg(long, value_name = "D", default_value_t = 365,
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    expires_days: u64,
}

#[derive(Debug, Args)]
struct SignArgs {
    /// Secret key file(s) to sign with.
    #[arg(long, value_name = "KEYFILE", required = true, num_args = 1..)]
    sign: Vec<PathBuf>,
    /// Write the result even when it has fewer signatures than its threshold; the other
    /// key holders then add theirs with `pollen keys trust sign`.
    #[arg(long)]
    partial: bool,
    /// Where to write the signed trust root.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct TrustCreateArgs {
    #[command(flatten)]
    body: TrustBodyArgs,
    #[command(flatten)]
    sign: SignArgs,
}

#[derive(Debug, Args)]
struct TrustRotateArgs {
    /// The trust root in force, which the new one replaces.
    #[arg(long, value_name = "FILE")]
    current: PathBuf,
    #[command(flatten)]
    body: TrustBodyArgs,
    /// Drop the fleet key: nodes no longer need certificates.
    #[arg(long, conflicts_with = "fleet_key")]
    no_fleet_key: bool,
    #[command(flatten)]
    sign: SignArgs,
}

#[derive(Debug, Args)]
struct CertifyArgs {
    /// The fleet secret key file.
    #[arg(long, value_name = "KEYFILE")]
    fleet: PathBuf,
    /// The node's public key.
    #[arg(long, value_name = "PUBKEY")]
    node: String,
    /// A label for humans (site, device class).
    #[arg(long, value_name = "L", default_value = "")]
    label: String,
    /// Days until the certificate expires.
    #[arg(long, value_name = "D", default_value_t = 365,
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    expires_days: u64,
    /// Check the certificate against this trust root's fleet key before writing.
    #[arg(long, value_name = "FILE")]
    trust: Option<PathBuf>,
    /// Where to write the certificate.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Show a node certificate.
    Show {
        /// The certificate file.
        file: PathBuf,
        /// Also check it against this trust root.
        #[arg(long, value_name = "FILE")]
        trust: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ManifestCommand {
    /// Hash files into a manifest (one variant, "default") and sign it.
    Create(Box<ManifestCreateArgs>),
    /// Add signatures to a manifest file in place (offline, for thresholds above one).
    Sign {
        /// The manifest file to sign.
        file: PathBuf,
        /// Secret key file(s) to sign with.
        #[arg(long, value_name = "KEYFILE", required = true, num_args = 1..)]
        key: Vec<PathBuf>,
        /// Report whether this trust root accepts the result.
        #[arg(long, value_name = "FILE")]
        trust: Option<PathBuf>,
    },
    /// Show a manifest.
    Show {
        /// The manifest file.
        file: PathBuf,
        /// Also check it against this trust root.
        #[arg(long, value_name = "FILE")]
        trust: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ManifestCreateArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    /// Check the result against this trust root before writing (refused if a node holding
    /// it would never accept the manifest; fewer signatures than the threshold only warn).
    #[arg(long, value_name = "FILE")]
    trust: Option<PathBuf>,
    /// Where to write the signed manifest.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Run `pollen keys …`, printing results to `out`.
pub fn run(args: KeysArgs, out: &mut dyn Write) -> Result<()> {
    match args.command {
        KeysCommand::Generate { out: path } => {
            let key = generate_key_file(&path)?;
            writeln!(out, "{}", public_key(&key))?;
            eprintln!("wrote secret key to {} (mode 0600)", path.display());
        }
        KeysCommand::Public { keyfile } => {
            writeln!(out, "{}", public_key(&load_key_file(&keyfile)?))?;
        }
        KeysCommand::Trust { command } => run_trust(command, out)?,
        KeysCommand::Certify(a) => certify(a, out)?,
        KeysCommand::Cert {
            command: CertCommand::Show { file, trust },
        } => {
            let (signed, body) = read_signed::<NodeCertBody>(&file, "node certificate")?;
            let now = unix_now()?;
            write!(out, "{}", cert::describe(&signed, &body, now))?;
            if let Some(path) = trust {
                let root = load_trust_root(&path)?;
                let line = match cert::check_against(&signed, &root, now) {
                    Ok(()) => "yes".to_string(),
                    Err(e) => format!("NO ({e:#})"),
                };
                writeln!(
                    out,
                    "  accepted under trust root version {}: {line}",
                    root.body.version
                )?;
            }
        }
        KeysCommand::Manifest { command } => run_manifest(command, out)?,
    }
    Ok(())
}

/// A trust root file that is validly self-signed to its threshold (expired or not).
fn load_trust_root(path: &Path) -> Result<TrustRoot> {
    let (signed, _) = read_signed::<TrustRootBody>(path, "trust root")?;
    trust::verify_self_signed(signed).with_context(|| format!("trust root {}", path.display()))
}

fn parse_keys(args: &[String]) -> Result<Vec<pollen_protocol::PublicKey>> {
    args.iter().map(|a| parse_public_key(a)).collect()
}

/// The trust root body from the arguments, on top of `base` (rotation) or of the
/// create defaults.
fn trust_body(
    a: &TrustBodyArgs,
    base: Option<&TrustRootBody>,
    no_fleet_key: bool,
    now: UnixTime,
) -> Result<TrustRootBody> {
    let root_keys = match (a.roots.is_empty(), base) {
        (false, _) => parse_keys(&a.roots)?,
        (true, Some(b)) => b.root_keys.clone(),
        (true, None) => bail!("a trust root needs at least one --root key"),
    };
    let publishers = match (a.publishers.is_empty(), base) {
        (false, _) => a
            .publishers
            .iter()
            .map(|p| trust::parse_publisher(p))
            .collect::<Result<_>>()?,
        (true, Some(b)) => b.publishers.clone(),
        (true, None) => bail!("a trust root needs at least one --publisher KEY=PATTERN"),
    };
    let fleet_key = match (&a.fleet_key, base) {
        (Some(k), _) => Some(parse_public_key(k).context("--fleet-key")?),
        (None, Some(b)) if !no_fleet_key => b.fleet_key,
        (None, _) => None,
    };
    let version = match (a.version, base) {
        (Some(v), _) => v,
        (None, Some(b)) => b
            .version
            .checked_add(1)
            .context("the current version is the last one")?,
        (None, None) => 1,
    };
    if let Some(b) = base {
        let carried = a.root_threshold.is_none() && usize::from(b.root_threshold) > root_keys.len();
        let carried_pub = a.publish_threshold.is_none()
            && !publishers.is_empty()
            && usize::from(b.publish_threshold) > publishers.len();
        if carried || carried_pub {
            bail!(
                "the current thresholds (root {}, publish {}) exceed the new key lists: give \
                 --root-threshold / --publish-threshold",
                b.root_threshold,
                b.publish_threshold
            );
        }
    }
    Ok(TrustRootBody {
        version,
        created: now,
        expires: now.plus(days(a.expires_days)),
        root_keys,
        root_threshold: a
            .root_threshold
            .or(base.map(|b| b.root_threshold))
            .unwrap_or(1),
        publishers,
        publish_threshold: a
            .publish_threshold
            .or(base.map(|b| b.publish_threshold))
            .unwrap_or(1),
        fleet_key,
    })
}

/// Write a signed trust root if complete or `--partial`, and say how it stands.
fn finish_trust(
    signed: &pollen_protocol::trust::SignedTrustRoot,
    body: &TrustRootBody,
    completion: Completion,
    sign: &SignArgs,
    whose: &str,
    out: &mut dyn Write,
) -> Result<()> {
    let (have, need) = completion.counts();
    if !completion.is_complete() && !sign.partial {
        bail!(
            "trust root signed by {have} of the {need} {whose} its threshold requires: \
             nothing written (give more --sign keys, or pass --partial and have the other \
             holders add theirs with `pollen keys trust sign`)"
        );
    }
    write_signed(&sign.out, signed)?;
    writeln!(
        out,
        "wrote trust root version {} to {} ({have} of {need} {whose} signed)",
        body.version,
        sign.out.display()
    )?;
    if !completion.is_complete() {
        eprintln!(
            "warning: nodes refuse this trust root until {} more {whose} sign it \
             (`pollen keys trust sign {} --key KEYFILE`)",
            need - have,
            sign.out.display()
        );
    }
    Ok(())
}

fn run_trust(command: TrustCommand, out: &mut dyn Write) -> Result<()> {
    let now = unix_now()?;
    match command {
        TrustCommand::Create(a) => {
            let body = trust_body(&a.body, None, false, now)?;
            let keys = load_keys(&a.sign.sign)?;
            let refs: Vec<&SigningKey> = keys.iter().collect();
            let (signed, c) = trust::create(&body, &refs, now)?;
            finish_trust(&signed, &body, c, &a.sign, "root keys", out)?;
        }
        TrustCommand::Rotate(a) => {
            let current = load_trust_root(&a.current)?;
            if current.body.expires <= now {
                eprintln!(
                    "warning: the current trust root (version {}) has expired",
                    current.body.version
                );
            }
            let body = trust_body(&a.body, Some(&current.body), a.no_fleet_key, now)?;
            let keys = load_keys(&a.sign.sign)?;
            let refs: Vec<&SigningKey> = keys.iter().collect();
            let (signed, c) = trust::rotate(&current, &body, &refs, now)?;
            let whose = format!("root keys of version {}", current.body.version);
            finish_trust(&signed, &body, c, &a.sign, &whose, out)?;
            if !trust::self_completion(&signed, &body).is_complete() {
                eprintln!(
                    "note: not signed to threshold by its own root keys: nodes that hold \
                     version {} accept it, but a new node cannot start from it alone",
                    current.body.version
                );
            }
        }
        TrustCommand::Sign { file, key, current } => {
            let (mut signed, body) = read_signed::<TrustRootBody>(&file, "trust root")?;
            let current = current.as_deref().map(load_trust_root).transpose()?;
            let mut c = None;
            for k in load_keys(&key)? {
                c = Some(trust::add_signature(
                    &mut signed,
                    &k,
                    current.as_ref(),
                    now,
                )?);
            }
            write_signed(&file, &signed)?;
            if let Some(c) = c {
                let (have, need) = c.counts();
                let state = if c.is_complete() {
                    "complete"
                } else {
                    "more signatures needed"
                };
                writeln!(
                    out,
                    "signed trust root version {} in {}: {have} of {need} required ({state})",
                    body.version,
                    file.display()
                )?;
            }
        }
        TrustCommand::Show { file, current } => {
            let (signed, body) = read_signed::<TrustRootBody>(&file, "trust root")?;
            let current = current.as_deref().map(load_trust_root).transpose()?;
            write!(
                out,
                "{}",
                trust::describe(&signed, &body, now, current.as_ref())
            )?;
        }
    }
    Ok(())
}

fn certify(a: CertifyArgs, out: &mut dyn Write) -> Result<()> {
    let now = unix_now()?;
    let fleet = load_key_file(&a.fleet)?;
    let node = NodeId(parse_public_key(&a.node).context("--node")?.0);
    let signed = cert::certify(&fleet, node, &a.label, now, now.plus(days(a.expires_days)))?;
    if let Some(path) = &a.trust {
        cert::check_against(&signed, &load_trust_root(path)?, now)?;
    }
    write_signed(&a.out, &signed)?;
    writeln!(
        out,
        "wrote certificate for node {node} to {} (fleet key {})",
        a.out.display(),
        public_key(&fleet)
    )?;
    Ok(())
}

fn run_manifest(command: ManifestCommand, out: &mut dyn Write) -> Result<()> {
    let now = unix_now()?;
    match command {
        ManifestCommand::Create(a) => {
            let release = build_release(&a.release, now, &mut |_, _| {})?;
            let m = &release.manifest;
            let trust = a.trust.as_deref().map(load_trust_root).transpose()?;
            if let Some(t) = &trust {
                check_manifest(m, t, now)?;
            }
            if let Some(bytes) = &release.golden_file {
                let mut name = a.out.clone().into_os_string();
                name.push(".");
                name.push(pollen_protocol::manifest::GOLDEN_FILE);
                let path = PathBuf::from(name);
                std::fs::write(&path, bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                writeln!(
                    out,
                    "the golden checks ({} bytes) are a file of the release: wrote it to {}; \
                     upload it with the model files",
                    bytes.len(),
                    path.display()
                )?;
            }
            write_signed(&a.out, &m.signed)?;
            writeln!(
                out,
                "wrote manifest {} ({} version {}, {} signature(s)) to {}",
                m.id,
                m.body.channel,
                m.body.version,
                m.signed.signatures().len(),
                a.out.display()
            )?;
        }
        ManifestCommand::Sign { file, key, trust } => {
            let (mut signed, _) = read_signed::<ManifestBody>(&file, "manifest")?;
            for k in load_keys(&key)? {
                mf::add_signature(&mut signed, &k)?;
            }
            let m = Manifest::decode(signed).context("the signed manifest does not decode")?;
            if let Some(path) = &trust {
                check_manifest(&m, &load_trust_root(path)?, now)?;
            }
            write_signed(&file, &m.signed)?;
            writeln!(
                out,
                "signed manifest {} in {}: {} signature(s)",
                m.id,
                file.display(),
                m.signed.signatures().len()
            )?;
        }
        ManifestCommand::Show { file, trust } => {
            let (signed, _) = read_signed::<ManifestBody>(&file, "manifest")?;
            let m = Manifest::decode(signed).context("the manifest does not decode")?;
            let trust = trust.as_deref().map(load_trust_root).transpose()?;
            write!(out, "{}", mf::describe(&m, now, trust.as_ref()))?;
        }
    }
    Ok(())
}

/// Refuse a manifest a node holding `trust` would never accept; only warn when it lacks
/// signatures that co-signers can still add.
fn check_manifest(m: &Manifest, trust: &TrustRoot, now: UnixTime) -> Result<()> {
    use pollen_protocol::trust::TrustError;
    match trust.authorise_manifest(m, now) {
        Ok(()) => Ok(()),
        Err(TrustError::UnderThreshold { have, need }) => {
            eprintln!(
                "warning: {have} of {need} required signatures: nodes refuse the manifest \
                 until more publishers sign it (`pollen keys manifest sign`)"
            );
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "a node holding trust root version {} would refuse this manifest: {e}",
            trust.body.version
        )),
    }
}
