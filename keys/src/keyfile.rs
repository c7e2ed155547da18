//! Secret key files and public keys on the command line.
//!
//! A secret key file is UTF-8 text of exactly two lines:
//!
//! ```text
//! pollen-secret-key-v1
//! <64 lowercase hex digits: the 32-byte ed25519 secret seed>
//! ```
//!
//! It is created with mode 0600 (on Unix) and never overwritten. Loading accepts `\r\n`
//! line ends and upper-case hex, nothing else.
//!
//! A public key is written as 64 hex digits. Wherever a public key is expected, a path to
//! a secret key file (its public half is used) or to a file holding just the 64 hex digits
//! (what `pollen keys public` prints) is accepted too.

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use pollen_protocol::PublicKey;
use pollen_protocol::ids::parse_hex32;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::Path;

/// First line of a secret key file.
pub const KEY_FILE_HEADER: &str = "pollen-secret-key-v1";

/// Largest file read as a key file; a real one is 86 bytes.
const MAX_KEY_FILE_LEN: u64 = 1024;

/// A fresh ed25519 key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| anyhow::anyhow!("cannot read the system random source: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    Ok(key)
}

/// The key file text for `key` (see the module doc). The caller must not leak it.
fn encode(key: &SigningKey) -> Vec<u8> {
    format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(key.to_bytes())).into_bytes()
}

/// Parse key file text; `None` when it is not exactly the format of the module doc.
fn decode(text: &[u8]) -> Option<SigningKey> {
    let text = std::str::from_utf8(text).ok()?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    if lines.next()? != KEY_FILE_HEADER {
        return None;
    }
    let hex = lines.next()?;
    // Only an empty remainder (the final newline) may follow.
    if lines.any(|l| !l.is_empty()) || hex.len() != 64 {
        return None;
    }
    let mut seed = parse_hex32(hex)?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    Some(key)
}

/// Write `key` to a new file at `path`, readable and writable by the owner only (0600).
///
/// Fails, touching nothing, when `path` already exists (even as a dangling symlink). On a
/// failure after creation the partial file is removed.
pub fn write_key_file(path: &Path, key: &SigningKey) -> Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            bail!(
                "key file {} already exists; refusing to overwrite",
                path.display()
            )
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create key file {}", path.display()));
        }
    };
    let mut text = encode(key);
    let written = file.write_all(&text).and_then(|()| file.sync_all());
    text.fill(0);
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot write key file {}", path.display()));
    }
    Ok(())
}

/// Generate a key and write it to a new file at `path` (see [`write_key_file`]).
pub fn generate_key_file(path: &Path) -> Result<SigningKey> {
    let key = generate_key()?;
    write_key_file(path, &key)?;
    Ok(key)
}

/// Read the first [`MAX_KEY_FILE_LEN`] + 1 bytes of `path`.
fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(path)?
        .take(MAX_KEY_FILE_LEN + 1)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// Load the secret key file at `path`.
///
/// Errors: the file cannot be read, it is readable or writable by others than its owner
/// (a secret key must be `chmod 600`), or "`path` is not a pollen key file" when its
/// content is not exactly the format of the module doc.
pub fn load_key_file(path: &Path) -> Result<SigningKey> {
    let mut text =
        read_small(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let key = decode(&text);
    text.fill(0);
    let key = key.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not a pollen key file (expected a first line {KEY_FILE_HEADER:?})",
            path.display()
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "key file {} is open to other users (mode {:o}): run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    Ok(key)
}

/// The public key of a secret key.
pub fn public_key(key: &SigningKey) -> PublicKey {
    pollen_protocol::signing::public_key(key)
}

/// Parse a public key given on the command line: 64 hex digits, or a path to a secret key
/// file or to a file holding 64 hex digits.
pub fn parse_public_key(arg: &str) -> Result<PublicKey> {
    if let Some(bytes) = parse_hex32(arg) {
        return Ok(PublicKey(bytes));
    }
    let path = Path::new(arg);
    if !path.exists() {
        bail!("{arg:?} is neither a public key (64 hex digits) nor an existing file");
    }
    let mut text = read_small(path).with_context(|| format!("cannot read {}", path.display()))?;
    let public = match std::str::from_utf8(&text).ok().and_then(parse_hex32) {
        Some(bytes) => Some(PublicKey(bytes)),
        None => decode(&text).map(|k| public_key(&k)),
    };
    text.fill(0);
    public.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not a pollen key file nor a public key file (64 hex digits)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        let key = generate_key_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("pollen-secret-key-v1\n"));
        assert_eq!(text.len(), KEY_FILE_HEADER.len() + 1 + 64 + 1);
        let loaded = load_key_file(&path).unwrap();
        assert_eq!(loaded.to_bytes(), key.to_bytes());
        assert_eq!(public_key(&loaded).to_hex().len(), 64);
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        fs::write(&path, b"precious").unwrap();
        let err = generate_key_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("already exists; refusing to overwrite"),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn two_keys_differ() {
        assert_ne!(
            generate_key().unwrap().to_bytes(),
            generate_key().unwrap().to_bytes()
        );
    }

    /// Write `text` to `path` with the mode key files need (0600).
    fn write_private(path: &Path, text: impl AsRef<[u8]>) {
        fs::write(path, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
        }
    }

    #[test]
    fn rejects_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key().unwrap();
        let hex = hex::encode(key.to_bytes());
        let cases: [(&str, String); 6] = [
            ("empty", String::new()),
            ("no header", format!("{hex}\n")),
            ("wrong header", format!("pollen-secret-key-v2\n{hex}\n")),
            ("short", format!("{KEY_FILE_HEADER}\n{}\n", &hex[..62])),
            ("not hex", format!("{KEY_FILE_HEADER}\n{}zz\n", &hex[..62])),
            ("trailing", format!("{KEY_FILE_HEADER}\n{hex}\nmore\n")),
        ];
        for (name, text) in cases {
            let path = dir.path().join(name);
            write_private(&path, text);
            let err = load_key_file(&path).unwrap_err().to_string();
            assert!(err.contains("is not a pollen key file"), "{name}: {err}");
        }
        // CRLF and upper case are fine.
        let path = dir.path().join("crlf");
        write_private(
            &path,
            format!("{KEY_FILE_HEADER}\r\n{}\r\n", hex.to_uppercase()),
        );
        assert_eq!(load_key_file(&path).unwrap().to_bytes(), key.to_bytes());
        let err = load_key_file(&dir.path().join("missing")).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read key file"),
            "{err:#}"
        );
    }

    #[test]
    fn public_key_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let key = generate_key_file(&path).unwrap();
        let pk = public_key(&key);
        assert_eq!(parse_public_key(&pk.to_hex()).unwrap(), pk);
        assert_eq!(parse_public_key(path.to_str().unwrap()).unwrap(), pk);
        let pub_path = dir.path().join("k.pub");
        fs::write(&pub_path, format!("{}\n", pk.to_hex())).unwrap();
        assert_eq!(parse_public_key(pub_path.to_str().unwrap()).unwrap(), pk);
        let err = parse_public_key("abc").unwrap_err().to_string();
        assert!(err.contains("neither a public key"), "{err}");
        let junk = dir.path().join("junk");
        fs::write(&junk, "hello").unwrap();
        let err = parse_public_key(junk.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a pollen key file"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn key_files_open_to_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        generate_key_file(&path).unwrap();
        load_key_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_key_file(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
