//! `pollen rollout halt|resume|rollback` and `pollen pin|unpin`: the operator's controls
//! over rollouts in flight, and a node's local pin.
//!
//! Halt and resume are signed instructions that spread like manifests; every node checks
//! them against its trust root. A rollback is a new, higher version that points to an older
//! artifact, so version numbers only grow and rollback protection stays intact.

use super::client;
use super::release::load_keys;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use pollen_keys::files::read_signed;
use pollen_keys::manifest as mf;
use pollen_keys::time::{days, parse_duration, unix_now};
use pollen_node::client::{ApiError, NodeClient};
use pollen_protocol::SigningKey;
use pollen_protocol::ids::ManifestId;
use pollen_protocol::manifest::{Channel, ManifestBody};
use pollen_protocol::rollout::{InstructionBody, RolloutAction, RolloutPlan};
use pollen_protocol::signing::Signed;
use std::io::Write;
use std::path::PathBuf;

const DEFAULT_NODE: &str = concat!("http://", "127.0.0.1:7411");

/// `pollen rollout …`.
#[derive(Debug, Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
}

/// What the operator signs and where it goes.
#[derive(Debug, Args)]
struct Signer {
    /// Publisher secret key file(s) allowed on the channel (as many as its threshold).
    #[arg(long, value_name = "KEYFILE", required = true, num_args = 1..)]
    key: Vec<PathBuf>,
    /// The node that injects it into the mesh.
    #[arg(long, value_name = "URL", default_value = DEFAULT_NODE)]
    node: String,
    #[command(flatten)]
    auth: super::AuthArgs,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Stop a rollout where it is: no further stage opens, nodes already on the version
    /// keep it.
    Halt {
        /// Channel.
        channel: String,
        /// Version (default: the highest the node knows on the channel).
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        #[command(flatten)]
        signer: Signer,
    },
    /// Undo a halt: stages whose time and gate have come open again.
    Resume {
        /// Channel.
        channel: String,
        /// Version (default: the highest the node knows on the channel).
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        #[command(flatten)]
        signer: Signer,
    },
    /// Publish a new version that serves the artifact of an older one (version numbers
    /// only grow, so no node refuses it as a replay).
    Rollback {
        /// Channel.
        channel: String,
        /// The version whose artifact and golden checks to serve again.
        #[arg(long, value_name = "V")]
        to: u64,
        /// Take the older release from this manifest file instead of asking the node.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Stages of the rollback release (default: everybody at once).
        #[arg(long, value_name = "5%,25%,100%", default_value = "100%")]
        stages: String,
        /// Time between stages.
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        stage_interval: String,
        /// Days until nodes that have not accepted the manifest refuse it.
        #[arg(long, value_name = "D", default_value_t = 30)]
        expires_days: u64,
        #[command(flatten)]
        signer: Signer,
    },
}

/// `pollen pin C V`: keep this node on version V of channel C whatever the rollouts say.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// Channel.
    channel: String,
    /// Version to stay on (default: the version the node serves now).
    version: Option<u64>,
    /// The node to pin.
    #[arg(long, value_name = "URL", default_value = DEFAULT_NODE)]
    node: String,
    #[command(flatten)]
    auth: super::AuthArgs,
}

/// `pollen unpin C`: follow the rollouts again.
#[derive(Debug, Args)]
pub struct UnpinArgs {
    /// Channel.
    channel: String,
    /// The node to unpin.
    #[arg(long, value_name = "URL", default_value = DEFAULT_NODE)]
    node: String,
    #[command(flatten)]
    auth: super::AuthArgs,
}

fn channel(c: &str) -> Result<Channel> {
    Channel::new(c).map_err(|e| anyhow::anyhow!("channel {c:?}: {e}"))
}

/// The highest version of `c` the node knows, or an error naming what it knows.
fn highest(client: &NodeClient, c: &str) -> Result<u64> {
    let s = client.status()?;
    let node = client.base();
    match s.channels.iter().find(|ch| ch.channel == c) {
        Some(ch) if ch.highest > 0 => Ok(ch.highest),
        _ => bail!("the node at {node} knows no release of channel {c}"),
    }
}

/// The node's refusal as a message; a transport failure names the node.
fn refusal(node: &str, e: ApiError) -> String {
    match e {
        ApiError::Transport(e) => format!("cannot reach the node at {node}: {e}"),
        ApiError::Refused { error, .. } => error,
    }
}

/// `pollen rollout …`.
pub fn run(a: RolloutArgs, out: &mut dyn Write) -> Result<()> {
    match a.command {
        RolloutCommand::Halt {
            channel,
            version,
            signer,
        } => instruct(&channel, version, RolloutAction::Halt, &signer, out),
        RolloutCommand::Resume {
            channel,
            version,
            signer,
        } => instruct(&channel, version, RolloutAction::Resume, &signer, out),
        RolloutCommand::Rollback {
            channel,
            to,
            manifest,
            stages,
            stage_interval,
            expires_days,
            signer,
        } => rollback(
            &channel,
            to,
            manifest,
            &stages,
            &stage_interval,
            expires_days,
            &signer,
            out,
        ),
    }
}

fn instruct(
    c: &str,
    version: Option<u64>,
    action: RolloutAction,
    signer: &Signer,
    out: &mut dyn Write,
) -> Result<()> {
    let ch = channel(c)?;
    let keys = load_keys(&signer.key)?;
    let client = client(&signer.node, &signer.auth);
    let node = client.base();
    let version = match version {
        Some(v) => v,
        None => highest(&client, c)?,
    };
    let body = InstructionBody {
        channel: ch,
        version,
        action,
        issued: unix_now()?,
    };
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let signed = Signed::sign(&body, &refs);
    client
        .post_instruction(&signed.to_bytes())
        .map_err(|e| refusal(node, e))
        .map_err(|e| anyhow::anyhow!("the node refused the instruction: {e}"))?;
    let verb = match action {
        RolloutAction::Halt => "halted",
        RolloutAction::Resume => "resumed",
    };
    writeln!(out, "{verb} {c} version {version} (spreading from {node})")?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn rollback(
    c: &str,
    to: u64,
    manifest: Option<PathBuf>,
    stages: &str,
    stage_interval: &str,
    expires_days: u64,
    signer: &Signer,
    out: &mut dyn Write,
) -> Result<()> {
    let ch = channel(c)?;
    let keys = load_keys(&signer.key)?;
    let client = client(&signer.node, &signer.auth);
    let node = client.base();
    let current = highest(&client, c)?;
    if to >= current {
        bail!("--to {to} must be below the current version {current} of {c}");
    }
    let (old, old_body): (_, ManifestBody) = match &manifest {
        Some(p) => read_signed(p, "manifest")?,
        None => {
            let bytes = match client.manifest(c, to) {
                Ok(b) => b,
                Err(ApiError::Transport(e)) => {
                    return Err(anyhow::Error::new(ApiError::Transport(e)))
                        .with_context(|| format!("cannot reach the node at {node}"));
                }
                Err(ApiError::Refused { error, .. }) => {
                    bail!("{error}; pass the manifest file of version {to} with --manifest")
                }
            };
            let (s, _) = Signed::<ManifestBody>::from_bytes(&bytes)
                .map_err(|e| anyhow::anyhow!("the node sent a malformed manifest: {e}"))?;
            let body = s
                .decode_body()
                .map_err(|e| anyhow::anyhow!("the node sent a malformed manifest: {e}"))?;
            (s, body)
        }
    };
    if old_body.channel != ch || old_body.version != to {
        bail!(
            "that manifest is {} version {}, not {c} version {to}",
            old_body.channel,
            old_body.version
        );
    }
    let interval = parse_duration(stage_interval).context("--stage-interval")?;
    let rollout: RolloutPlan = mf::parse_stages(stages, interval, None).context("--stages")?;
    let now = unix_now()?;
    let version = current + 1;
    let body = ManifestBody {
        version,
        rollout,
        created: now,
        expires: now.plus(days(expires_days)),
        replaces: Some(ManifestId(old.body_hash())),
        ..old_body
    };
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let m = mf::sign(&body, &refs)?;
    client
        .post_manifest(&m.signed.to_bytes())
        .map_err(|e| refusal(node, e))
        .map_err(|e| anyhow::anyhow!("the node refused the rollback release: {e}"))?;
    writeln!(
        out,
        "rolled {c} back to the artifact of version {to}, published as version {version} (manifest {})",
        m.id
    )?;
    Ok(())
}

fn put_pin(node: &str, auth: &super::AuthArgs, c: &str, version: Option<u64>) -> Result<()> {
    channel(c)?;
    let client = client(node, auth);
    let node = client.base();
    match client.pin(c, version) {
        Ok(()) => Ok(()),
        Err(ApiError::Transport(e)) => Err(anyhow::Error::new(ApiError::Transport(e)))
            .with_context(|| format!("cannot reach the node at {node}")),
        Err(ApiError::Refused { error, .. }) => bail!("the node refused: {error}"),
    }
}

/// `pollen pin`.
pub fn pin(a: PinArgs, out: &mut dyn Write) -> Result<()> {
    let version = match a.version {
        Some(v) => v,
        None => {
            let s = client(&a.node, &a.auth).status()?;
            s.channels
                .iter()
                .find(|c| c.channel == a.channel)
                .and_then(|c| c.active_version)
                .with_context(|| {
                    format!("the node serves nothing on {}: name a version", a.channel)
                })?
        }
    };
    put_pin(&a.node, &a.auth, &a.channel, Some(version))?;
    writeln!(
        out,
        "pinned {} to version {version} on {}",
        a.channel, a.node
    )?;
    Ok(())
}

/// `pollen unpin`.
pub fn unpin(a: UnpinArgs, out: &mut dyn Write) -> Result<()> {
    put_pin(&a.node, &a.auth, &a.channel, None)?;
    writeln!(
        out,
        "{} follows the rollouts again on {}",
        a.channel, a.node
    )?;
    Ok(())
}
