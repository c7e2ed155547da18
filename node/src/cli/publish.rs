//! `pollen publish`: hash and sign files into a release locally, upload them, inject the
//! manifest.

use super::release::{ReleaseArgs, build_release};
use anyhow::{Context, Result, bail};
use clap::Args;
use pollen_keys::time::unix_now;
use pollen_node::client::{ApiError, NodeClient};
use pollen_protocol::manifest::GOLDEN_FILE;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// How long an upload may take (large model files over a slow disk).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// `pollen publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    /// The node to publish through.
    #[arg(long, value_name = "URL", default_value = concat!("http://", "127.0.0.1:7411"))]
    node: String,
    #[command(flatten)]
    auth: super::AuthArgs,
}

/// `pollen publish`: hash and sign locally, upload the files, inject the manifest.
pub fn publish(a: PublishArgs, out: &mut dyn Write) -> Result<()> {
    let client = NodeClient::new(&a.node, UPLOAD_TIMEOUT).with_token(a.auth.token());
    let node = client.base().to_string();
    let status = client.status()?;
    if status.trust_version == 0 {
        bail!("the node at {node} has no trust root: start it with --trust FILE");
    }
    if let Some(c) = status
        .channels
        .iter()
        .find(|c| c.channel == a.release.channel)
        && a.release.version <= c.highest
    {
        bail!(
            "version {} is not above the current version {} of channel {}",
            a.release.version,
            c.highest,
            c.channel
        );
    }
    // A node answers an upload without the token before reading the body, which a client
    // writing a large file sees only as a broken pipe: ask once, cheaply, first.
    if let Err(ApiError::Refused {
        status: 401, error, ..
    }) = client.post_manifest(&[])
    {
        bail!(
            "the node at {node} refused this client: {error} (give --data-dir of the node, \
             --token-file, or POLLEN_API_TOKEN)"
        );
    }
    let total: u64 = super::release::hashed_bytes(&a.release);
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("hashing");
    let mut base = 0u64;
    let mut last_file = None::<PathBuf>;
    let release = build_release(&a.release, unix_now()?, &mut |path, n| {
        if last_file.as_deref() != Some(path) {
            if let Some(prev) = &last_file {
                base += std::fs::metadata(prev).map(|m| m.len()).unwrap_or(0);
            }
            last_file = Some(path.to_path_buf());
        }
        bar.set_position(base + n);
    })?;
    bar.finish_and_clear();
    let m = &release.manifest;
    let chunk_size = |cid: &pollen_protocol::ContentId| {
        m.body
            .artifact
            .variants
            .iter()
            .flat_map(|v| &v.files)
            .find(|f| f.spec.content_id == *cid)
            .map(|f| f.spec.chunk_size.get())
    };
    let mut uploads: Vec<(
        String,
        pollen_protocol::ContentId,
        Box<dyn std::io::Read + Send>,
    )> = Vec::new();
    for (path, cid) in &release.files {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        uploads.push((path.display().to_string(), *cid, Box::new(file)));
    }
    if let Some(bytes) = release.golden_file {
        let golden = m.body.artifact.variants[0]
            .golden_file()
            .map(|f| f.spec.content_id)
            .context("the golden file is not in the manifest")?;
        uploads.push((
            GOLDEN_FILE.to_string(),
            golden,
            Box::new(std::io::Cursor::new(bytes)),
        ));
    }
    for (what, cid, reader) in uploads {
        let chunk = chunk_size(&cid).context("a file is not in the manifest")?;
        match client.put_file(&cid, chunk, reader) {
            Ok(()) => {}
            Err(ApiError::Transport(e)) => {
                return Err(anyhow::Error::new(ApiError::Transport(e)))
                    .with_context(|| format!("uploading {what} to {node}"));
            }
            Err(ApiError::Refused { error, .. }) => {
                bail!("the node refused {what}: {error}");
            }
        }
    }
    match client.post_manifest(&m.signed.to_bytes()) {
        Ok(_) => {}
        Err(ApiError::Transport(e)) => {
            return Err(anyhow::Error::new(ApiError::Transport(e)))
                .with_context(|| format!("sending the manifest to {node}"));
        }
        Err(ApiError::Refused { error, code, .. }) => {
            bail!(
                "the node refused the manifest ({}): {error}",
                refusal_hint(code.as_deref())
            );
        }
    }
    writeln!(
        out,
        "published {} version {} as manifest {} through {node}",
        m.body.channel, m.body.version, m.id
    )?;
    Ok(())
}

/// What an operator should check, by the node's label of the refusal.
fn refusal_hint(code: Option<&str>) -> &'static str {
    match code {
        Some("forged") => {
            "unknown key: none of the signing keys is a publisher in the node's trust root"
        }
        Some("out_of_scope") => "channel not allowed for that key",
        Some("stale") => "version not above the current one",
        _ => "refused",
    }
}
