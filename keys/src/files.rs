//! Signed object files: reading with a size bound, writing atomically.
//!
//! Trust roots, manifests and node certificates are stored as the binary envelope bytes of
//! [`Signed::to_bytes`], exactly as they travel on the wire, and read back with
//! [`Signed::from_bytes`] (canonical encoding and field rules checked; signatures are
//! checked separately, against a trust root). The envelope carries no tag of its kind, so
//! the caller says which kind it expects.

use anyhow::{Context, Result, bail};
use pollen_protocol::signing::{Signed, SignedBody};
use std::fs;
use std::io::{Read, Write};
use std::path::Path;

/// Largest signed object file read: a manifest travels in a 1 MiB control frame.
pub const MAX_SIGNED_FILE_LEN: u64 = 2 * 1024 * 1024;

/// Read the signed object of kind `T` at `path`. `what` names the kind in errors
/// ("trust root", "manifest", …).
///
/// Errors: the file cannot be read, is larger than [`MAX_SIGNED_FILE_LEN`], or
/// "`path` is not a pollen `what`" when it does not decode as one.
pub fn read_signed<T: SignedBody>(path: &Path, what: &str) -> Result<(Signed<T>, T)> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_SIGNED_FILE_LEN + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if bytes.len() as u64 > MAX_SIGNED_FILE_LEN {
        bail!(
            "{} is larger than {MAX_SIGNED_FILE_LEN} bytes: not a pollen {what}",
            path.display()
        );
    }
    Signed::<T>::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a pollen {what}: {e}", path.display()))
}

/// Write `signed` to `path` (see [`write_atomic`]).
pub fn write_signed<T: SignedBody>(path: &Path, signed: &Signed<T>) -> Result<()> {
    write_atomic(path, &signed.to_bytes())
}

/// Replace `path` with `bytes` atomically: a temporary file beside it is written, synced
/// and renamed over it, so readers see the old content or the new, never a mix. An
/// existing file is replaced (signed objects are public and can be made again; secret key
/// files are never written through this).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} does not name a file", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    // Make the rename durable too; a failure here leaves a complete file either way.
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
