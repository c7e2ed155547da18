//! The on-disk store: content-addressed files, partial downloads with durable chunk records,
//! and the node's control state (trust roots, manifests, node state).
//!
//! The store is synchronous (`std::fs`). The node calls it from
//! `tokio::task::spawn_blocking`, from several threads at once: [`Store`] is `Send + Sync`,
//! shared as `Arc<Store>`, and its locks are held only around in-memory bookkeeping (the
//! file's own I/O runs outside them, except where a rename must not race a write; see
//! [`Store::finish`]). One `Store` per data directory: two processes (or two `Store`s) on
//! the same directory are not supported.
//!
//! # Layout
//!
//! ```text
//! <data dir>/
//!   blobs/<content-id-hex>            complete files, named by the BLAKE3 of their bytes
//!   partial/<content-id-hex>.part     a download in progress: the file's bytes at their
//!                                     offsets (sparse, preallocated with set_len)
//!   partial/<content-id-hex>.have     the durable chunk record of that download
//!   manifests/<manifest-id-hex>.manifest   signed manifest envelopes, bytes as received
//!   trust/root-<version>.pollen       trust root envelopes, every version kept (the chain)
//!   state.json                        NodeState (JSON)
//!   <any dir>/.tmp-*                  temporary files: removed by `Store::open`
//! ```
//!
//! The `.have` record is binary, little endian:
//!
//! ```text
//! magic      8 bytes  "PLNHAVE1"
//! content id 32 bytes
//! size       u64      file size in bytes
//! chunk size u32
//! count      u32      number of chunks
//! bitmap     ceil(count / 8) bytes; bit i (byte i / 8, bit i % 8) = chunk i is durable;
//!                     bits past `count` are zero
//! checksum   32 bytes BLAKE3 of everything above
//! ```
//!
//! A record that fails any check (length, magic, checksum, content id, size, chunk size) is
//! discarded: the download restarts from nothing rather than trust it.
//!
//! # Crash safety
//!
//! Every control file (`state.json`, manifests, trust roots, `.have` records) is written to a
//! temporary file in the same directory, fsynced, renamed over its final name, and the
//! directory is fsynced. A blob is created only by renaming a fully written and fsynced file
//! into `blobs/`, followed by an fsync of `blobs/`. A chunk is written into the `.part` file
//! at its offset and is then *pending*; [`Store::sync`] fsyncs the `.part` file first and
//! only then writes a new `.have` record that adds the pending chunks (so the record is
//! never ahead of the data), and only chunks returned by `sync` may be counted as present.
//!
//! Hence, after a `kill -9` at any instant:
//!
//! * [`Store::open`] followed by [`Store::open_file`] reports only chunks whose bytes were
//!   fsynced before the record naming them was written;
//! * a blob exists only if it is complete and was fsynced before it got its name;
//! * temporary files are ignored and removed by [`Store::open`]; a `.have` without its
//!   `.part`, or a partial whose blob exists, is removed too;
//! * nothing corrupt is reported, served or loaded: chunks are verified before they are
//!   written ([`Store::write_chunk`]), a file spec is checked (its chaining values combine to
//!   its content id) before a download is registered, and a damaged record is discarded.
//!
//! A full disk (`ENOSPC`, or `EDQUOT` for a quota) is [`StoreError::DiskFull`], never a
//! panic, and a failed write or sync leaves the durable record unchanged (the chunks stay
//! pending, or are not recorded at all, and can be written or synced again).
//!
//! Out of scope: bit rot of bytes after they were fsynced (blobs are not rehashed on read;
//! peers verify every chunk they receive anyway).

use pollen_protocol::chunking::{ChunkSize, FileHasher, FileSpec};
use pollen_protocol::ids::{ContentId, ManifestId};
use pollen_protocol::wire::Bitfield;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk (or the user's quota) is full: `ENOSPC` or `EDQUOT`. Nothing durable changed;
    /// free space (for instance with [`Store::gc`]) and retry.
    #[error("disk full writing {}", path.display())]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Any other I/O error on a file of the store (or on the source of an import).
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading the input of [`Store::import_reader`] failed (for instance an HTTP upload
    /// body broke off). The store is unchanged.
    #[error("reading the input failed: {0}")]
    Input(#[source] io::Error),
    /// Something failed verification. From [`Store::write_chunk`] this means only that the
    /// chunk failed verification against its spec (it was not written: penalise its
    /// sender); from [`Store::load_state`], that `state.json` does not parse.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The blob of this content id exists with another size than the spec says: the spec
    /// (or the blob) is wrong. Nothing is served from it under that spec.
    #[error("blob {file:?} has {blob_size} bytes, the spec says {spec_size}")]
    BlobSize {
        /// The file.
        file: ContentId,
        /// Size of the blob on disk.
        blob_size: u64,
        /// Size in the spec.
        spec_size: u64,
    },
    /// The store has neither a blob nor a registered download of this file.
    #[error("unknown file {0:?}")]
    UnknownFile(ContentId),
    /// The file is known, but this chunk is not durable (or the index is out of range).
    #[error("chunk {index} of {file:?} is not present")]
    NotPresent {
        /// The file.
        file: ContentId,
        /// The chunk index asked for.
        index: u32,
    },
    /// [`Store::finish`] on a download that still misses chunks.
    #[error("{file:?} is incomplete: {durable} of {total} chunks durable")]
    Incomplete {
        /// The file.
        file: ContentId,
        /// Durable chunks.
        durable: u32,
        /// Chunks in the file.
        total: u32,
    },
    /// The file spec is invalid: its chaining values do not combine to its content id, or it
    /// has more than `u32::MAX` chunks.
    #[error("invalid file spec for {file:?}: {reason}")]
    InvalidSpec {
        /// The file.
        file: ContentId,
        /// Why.
        reason: String,
    },
    /// A download of this content id is registered with a different size or chunk size.
    /// One content id is downloaded under one spec at a time.
    #[error(
        "{file:?} is registered with size {registered_size} and chunk size {registered_chunk_size}"
    )]
    SpecMismatch {
        /// The file.
        file: ContentId,
        /// Size of the registered spec.
        registered_size: u64,
        /// Chunk size of the registered spec.
        registered_chunk_size: u32,
    },
    /// An imported file does not match what was expected; nothing was stored.
    #[error("imported content is {got:?} ({got_size} bytes), expected {expected:?}")]
    ContentMismatch {
        /// The expected content id.
        expected: ContentId,
        /// The content id of the bytes read.
        got: ContentId,
        /// The number of bytes read.
        got_size: u64,
    },
}

/// Map an I/O error on `path` to a [`StoreError`]: `ENOSPC` (28) and `EDQUOT` (122) become
/// [`StoreError::DiskFull`], anything else [`StoreError::Io`].
fn io_error(path: &Path, source: io::Error) -> StoreError {
    let full = matches!(source.raw_os_error(), Some(28 | 122))
        || matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        );
    let path = path.to_path_buf();
    if full {
        StoreError::DiskFull { path, source }
    } else {
        StoreError::Io { path, source }
    }
}

/// What the node persists about itself, in `state.json`.
///
/// Unknown fields are ignored and missing ones take their default, so fields can be added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeState {
    /// Highest manifest version accepted per channel (rollback protection across restarts).
    pub highest: BTreeMap<String, u64>,
    /// Active manifest per channel: channel name to manifest id (hex).
    pub active: BTreeMap<String, String>,
    /// Manifest ids (hex) this node published.
    pub published: BTreeSet<String>,
    /// Local version pins set at run time (`pollen pin`): channel to version.
    pub pins: BTreeMap<String, u64>,
    /// The latest rollout instruction per release ("channel@version"), as hex envelopes,
    /// so a restart does not forget a halt (bounded by the releases kept).
    pub instructions: BTreeMap<String, String>,
    /// Releases that failed to activate here, by manifest id (hex), so that a restart
    /// reports the failure again instead of trying the release again. Bounded by the
    /// releases kept.
    pub failed: BTreeMap<String, FailedActivation>,
    /// Releases whose activation was cut short by the process stopping, by manifest id
    /// (hex), with how often: the first time the release is tried again (a power cut or
    /// a `kill -9` is no verdict on a model), the second it counts as failed here (a model
    /// that kills the node while loading crashes it twice at most). Bounded by the
    /// releases kept.
    pub interrupted: BTreeMap<String, u32>,
}

/// Why a release failed to activate on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedActivation {
    /// The class reported.
    pub class: pollen_protocol::rollout::ErrorClass,
    /// What happened.
    pub detail: String,
}

const BLOBS: &str = "blobs";
const PARTIAL: &str = "partial";
const MANIFESTS: &str = "manifests";
const TRUST: &str = "trust";
/// Markers of activations in progress: `activating/<manifest id>`.
const ACTIVATING: &str = "activating";
const STATE: &str = "state.json";
const TMP_PREFIX: &str = ".tmp-";
const PART_EXT: &str = ".part";
const HAVE_EXT: &str = ".have";
const MANIFEST_EXT: &str = ".manifest";
const ROOT_PREFIX: &str = "root-";
const ROOT_EXT: &str = ".pollen";
const HAVE_MAGIC: &[u8; 8] = b"PLNHAVE1";
/// Buffer size of imports.
const IMPORT_BUF: usize = 1 << 20;

/// Lock a mutex; a panic elsewhere while it was held does not make the data unusable here
/// (every update under these locks is a single assignment or insert).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// fsync a directory, making renames, creations and removals in it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

/// Bytes a file occupies on disk (allocated blocks, so sparse `.part` files count only what
/// was written).
fn allocated(meta: &fs::Metadata) -> u64 {
    meta.blocks().saturating_mul(512)
}

/// Removes a temporary file when dropped, unless disarmed (after its rename).
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl TempGuard {
    fn new(path: PathBuf) -> Self {
        TempGuard { path, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Which chunks of a download are durable, and which are written but not yet synced.
#[derive(Debug)]
struct Bits {
    /// Chunks named in the durable `.have` record.
    durable: Bitfield,
    /// Chunks written into the `.part` file since the last sync; not yet durable.
    pending: BTreeSet<u32>,
    /// Durable chunks not yet returned by a sync (see [`Store::write_chunk`]).
    unreported: BTreeSet<u32>,
}

/// A registered download.
#[derive(Debug)]
struct Partial {
    /// The checked spec the download was registered with; chunks are verified against it.
    spec: FileSpec,
    count: u32,
    part_path: PathBuf,
    have_name: String,
    file: File,
    /// `true` once the download was finished (renamed into `blobs/`) or removed: its `file`
    /// is then no longer written, synced or read. Writes and syncs hold it shared; finishing
    /// and removal hold it exclusively.
    closed: RwLock<bool>,
    /// Serialises syncs of this file, so records are written in order.
    sync_lock: Mutex<()>,
    bits: Mutex<Bits>,
}

impl Partial {
    fn same_geometry(&self, spec: &FileSpec) -> Result<()> {
        if self.spec.size == spec.size && self.spec.chunk_size == spec.chunk_size {
            Ok(())
        } else {
            Err(StoreError::SpecMismatch {
                file: spec.content_id,
                registered_size: self.spec.size,
                registered_chunk_size: self.spec.chunk_size.get(),
            })
        }
    }
}

/// What registering a file found.
enum Registered {
    /// The blob exists: the file is complete.
    Blob,
    /// A download, in progress.
    Partial(Arc<Partial>),
}

/// The on-disk store of one node. See the [module documentation](self) for the layout and
/// the crash-safety contract.
pub struct Store {
    dir: PathBuf,
    blobs: PathBuf,
    partial: PathBuf,
    manifests: PathBuf,
    trust: PathBuf,
    /// Registered downloads. Held only to look up, insert or remove entries.
    partials: Mutex<BTreeMap<ContentId, Arc<Partial>>>,
    /// Serialises registration of downloads (which touches their files) and the partial
    /// phase of [`Store::gc`].
    open_lock: Mutex<()>,
    /// Serialises writes of `state.json`, so the last save to return is the one on disk.
    state_lock: Mutex<()>,
    /// Makes temporary file names unique.
    tmp_counter: AtomicU64,
    /// Chunks of complete files written (as duplicates) since the last sync, to report at
    /// the next one. At most one entry per chunk of a complete file; emptied by syncs.
    complete_reports: Mutex<BTreeMap<ContentId, BTreeSet<u32>>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("downloads", &lock(&self.partials).len())
            .finish_non_exhaustive()
    }
}

fn encode_record(spec: &FileSpec, count: u32, durable: &Bitfield) -> Vec<u8> {
    let bitmap_len = (count as usize).div_ceil(8);
    let mut out = Vec::with_capacity(8 + 32 + 8 + 4 + 4 + bitmap_len + 32);
    out.extend_from_slice(HAVE_MAGIC);
    out.extend_from_slice(spec.content_id.as_bytes());
    out.extend_from_slice(&spec.size.to_le_bytes());
    out.extend_from_slice(&spec.chunk_size.get().to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    let start = out.len();
    out.resize(start + bitmap_len, 0);
    for i in 0..count {
        if durable.get(i) {
            out[start + (i / 8) as usize] |= 1 << (i % 8);
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decode a `.have` record for `spec`; `Err` says why it cannot be trusted.
fn decode_record(bytes: &[u8], spec: &FileSpec, count: u32) -> Result<Bitfield, String> {
    const HEADER: usize = 8 + 32 + 8 + 4 + 4;
    let bitmap_len = (count as usize).div_ceil(8);
    if bytes.len() != HEADER + bitmap_len + 32 {
        return Err(format!("record has {} bytes", bytes.len()));
    }
    let (body, sum) = bytes.split_at(HEADER + bitmap_len);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    if &body[..8] != HAVE_MAGIC {
        return Err("bad magic".into());
    }
    if &body[8..40] != spec.content_id.as_bytes() {
        return Err("content id mismatch".into());
    }
    let word = |at: usize, n: usize| -> u64 {
        body[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    };
    let (size, chunk_size, rec_count) = (word(40, 8), word(48, 4), word(52, 4));
    if size != spec.size || chunk_size != spec.chunk_size.bytes() || rec_count != u64::from(count) {
        return Err(format!(
            "record is for size {size}, chunk size {chunk_size}; spec says {}, {}",
            spec.size,
            spec.chunk_size.get()
        ));
    }
    let bitmap = &body[HEADER..];
    let mut durable = Bitfield::new(count);
    for (byte_index, &byte) in bitmap.iter().enumerate() {
        for bit in 0..8u32 {
            if byte & (1 << bit) != 0 {
                let i = byte_index as u64 * 8 + u64::from(bit);
                if i >= u64::from(count) {
                    return Err("bits set past the last chunk".into());
                }
                durable.set(i as u32);
            }
        }
    }
    Ok(durable)
}

fn spec_chunk_count(spec: &FileSpec) -> Result<u32> {
    u32::try_from(spec.chunk_count()).map_err(|_| StoreError::InvalidSpec {
        file: spec.content_id,
        reason: format!("{} chunks (at most {})", spec.chunk_count(), u32::MAX),
    })
}

impl Store {
    /// Open (or create) the store in `data_dir`.
    ///
    /// Creates the directory and its subdirectories (fsyncing the parent when it created
    /// any), removes leftover temporary files (`.tmp-*`) everywhere, removes downloads whose
    /// blob exists and `.have` records without their `.part`. Nothing found on disk is
    /// trusted beyond what is durable: downloads are loaded (and their records checked) only
    /// when [`Store::open_file`] registers them.
    pub fn open(data_dir: &Path) -> Result<Store> {
        fs::create_dir_all(data_dir).map_err(|e| io_error(data_dir, e))?;
        let store = Store {
            dir: data_dir.to_path_buf(),
            blobs: data_dir.join(BLOBS),
            partial: data_dir.join(PARTIAL),
            manifests: data_dir.join(MANIFESTS),
            trust: data_dir.join(TRUST),
            partials: Mutex::new(BTreeMap::new()),
            open_lock: Mutex::new(()),
            state_lock: Mutex::new(()),
            tmp_counter: AtomicU64::new(0),
            complete_reports: Mutex::new(BTreeMap::new()),
        };
        let mut created = false;
        for d in [&store.blobs, &store.partial, &store.manifests, &store.trust] {
            match fs::create_dir(d) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(d, e)),
            }
        }
        if created {
            sync_dir(&store.dir)?;
        }
        for d in [
            &store.dir,
            &store.blobs,
            &store.partial,
            &store.manifests,
            &store.trust,
        ] {
            store.remove_temp_files(d)?;
        }
        store.clean_partials()?;
        Ok(store)
    }

    /// The data directory this store lives in.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    fn remove_temp_files(&self, dir: &Path) -> Result<()> {
        for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
            let entry = entry.map_err(|e| io_error(dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let path = entry.path();
                tracing::debug!(path = %path.display(), "removing leftover temporary file");
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(&path, e)),
                }
            }
        }
        Ok(())
    }

    /// Remove partial files made obsolete by a blob, and records without data.
    fn clean_partials(&self) -> Result<()> {
        for entry in fs::read_dir(&self.partial).map_err(|e| io_error(&self.partial, e))? {
            let entry = entry.map_err(|e| io_error(&self.partial, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some((cid, is_have)) = parse_partial_name(&name) else {
                continue;
            };
            let obsolete = self.has_blob(&cid);
            let orphan = is_have && !self.part_path(&cid).exists();
            if obsolete || orphan {
                let path = entry.path();
                tracing::debug!(path = %path.display(), obsolete, orphan, "removing partial file");
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(&path, e)),
                }
            }
        }
        Ok(())
    }

    fn temp_path(&self, dir: &Path, name: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("{TMP_PREFIX}{}-{n}-{name}", std::process::id()))
    }

    /// Write `bytes` to `dir/name` atomically: temporary file, fsync, rename, fsync `dir`.
    /// On error the previous file (if any) is untouched and the temporary file removed.
    fn write_atomic(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.temp_path(dir, name);
        let guard = TempGuard::new(tmp.clone());
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io_error(&tmp, e))?;
        f.sync_all().map_err(|e| io_error(&tmp, e))?;
        drop(f);
        let path = dir.join(name);
        fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
        guard.disarm();
        sync_dir(dir)
    }

    /// Remove `path` durably; a missing file is not an error.
    fn remove_durably(&self, dir: &Path, path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(path, e)),
        }
    }

    // ----- control state -----

    /// Persist a trust root envelope of `version` as `trust/root-<version>.pollen`,
    /// atomically. Every version is kept, so a rotated chain survives restarts; saving a
    /// version again replaces its bytes. The bytes are opaque here: the caller verifies.
    pub fn save_trust_root(&self, version: u64, bytes: &[u8]) -> Result<()> {
        self.write_atomic(
            &self.trust,
            &format!("{ROOT_PREFIX}{version}{ROOT_EXT}"),
            bytes,
        )
    }

    /// Every saved trust root envelope, in increasing version order. Files with other names
    /// are ignored.
    pub fn trust_roots(&self) -> Result<Vec<Vec<u8>>> {
        let mut found = BTreeMap::new();
        for (name, path) in list_dir(&self.trust)? {
            let version = name
                .strip_prefix(ROOT_PREFIX)
                .and_then(|s| s.strip_suffix(ROOT_EXT))
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(version) = version {
                found.insert(version, path);
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for path in found.values() {
            if let Some(bytes) = read_if_exists(path)? {
                out.push(bytes);
            }
        }
        Ok(out)
    }

    /// Persist a signed manifest envelope (bytes as received) under its id, atomically.
    /// Saving the same id again replaces the bytes (same body, possibly other signatures).
    pub fn save_manifest(&self, id: &ManifestId, bytes: &[u8]) -> Result<()> {
        self.write_atomic(
            &self.manifests,
            &format!("{}{MANIFEST_EXT}", id.to_hex()),
            bytes,
        )
    }

    /// Every saved manifest envelope with its id, in id order. The bytes are as saved; the
    /// caller decodes and verifies them. Files with other names are ignored.
    pub fn manifests(&self) -> Result<Vec<(ManifestId, Vec<u8>)>> {
        let mut found = BTreeMap::new();
        for (name, path) in list_dir(&self.manifests)? {
            let id = name
                .strip_suffix(MANIFEST_EXT)
                .and_then(|hex| hex.parse::<ManifestId>().ok());
            if let Some(id) = id {
                found.insert(id, path);
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (id, path) in found {
            if let Some(bytes) = read_if_exists(&path)? {
                out.push((id, bytes));
            }
        }
        Ok(out)
    }

    /// Remove a saved manifest, durably. Removing one that is not there is not an error.
    pub fn remove_manifest(&self, id: &ManifestId) -> Result<()> {
        let path = self
            .manifests
            .join(format!("{}{MANIFEST_EXT}", id.to_hex()));
        self.remove_durably(&self.manifests, &path)
    }

    /// Persist the node state as `state.json`, atomically. Concurrent saves are serialised:
    /// the last one to return is the one on disk.
    pub fn save_state(&self, state: &NodeState) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| StoreError::Corrupt(format!("encoding state: {e}")))?;
        let _g = lock(&self.state_lock);
        self.write_atomic(&self.dir, STATE, &bytes)
    }

    /// The saved node state, or the default when none was ever saved. A `state.json` that
    /// does not parse is [`StoreError::Corrupt`] (it is never silently replaced).
    pub fn load_state(&self) -> Result<NodeState> {
        let path = self.dir.join(STATE);
        match read_if_exists(&path)? {
            None => Ok(NodeState::default()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display()))),
        }
    }

    // ----- activation markers -----

    /// Record, durably, that release `id` is about to be loaded. A marker still present at
    /// start means the process died while activating it (see [`Store::activating`]).
    pub fn mark_activating(&self, id: &ManifestId) -> Result<()> {
        let dir = self.dir.join(ACTIVATING);
        if let Err(e) = fs::create_dir(&dir) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(io_error(&dir, e));
            }
        } else {
            sync_dir(&self.dir)?;
        }
        self.write_atomic(&dir, &id.to_hex(), b"")
    }

    /// Remove the marker of `id` (durably; a missing marker is not an error).
    pub fn clear_activating(&self, id: &ManifestId) -> Result<()> {
        let dir = self.dir.join(ACTIVATING);
        self.remove_durably(&dir, &dir.join(id.to_hex()))
    }

    /// The releases whose activation was in progress when the process last stopped.
    pub fn activating(&self) -> Result<Vec<ManifestId>> {
        let dir = self.dir.join(ACTIVATING);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&dir, e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| io_error(&dir, e))?;
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    // ----- files and chunks -----

    /// Where the complete file `cid` lives (or would live) in the store.
    pub fn blob_path(&self, cid: &ContentId) -> PathBuf {
        self.blobs.join(cid.to_hex())
    }

    /// Whether the complete file `cid` is in the store (it is then complete and durable).
    pub fn has_blob(&self, cid: &ContentId) -> bool {
        fs::metadata(self.blob_path(cid)).is_ok_and(|m| m.is_file())
    }

    fn part_path(&self, cid: &ContentId) -> PathBuf {
        self.partial.join(format!("{}{PART_EXT}", cid.to_hex()))
    }

    fn have_name(cid: &ContentId) -> String {
        format!("{}{HAVE_EXT}", cid.to_hex())
    }

    fn registered(&self, cid: &ContentId) -> Option<Arc<Partial>> {
        lock(&self.partials).get(cid).cloned()
    }

    /// Check an existing blob against a spec (a cheap size check).
    fn check_blob_size(&self, spec: &FileSpec, meta: &fs::Metadata) -> Result<()> {
        if meta.len() == spec.size {
            Ok(())
        } else {
            Err(StoreError::BlobSize {
                file: spec.content_id,
                blob_size: meta.len(),
                spec_size: spec.size,
            })
        }
    }

    /// Find or register the download of `spec`.
    fn register(&self, spec: &FileSpec) -> Result<Registered> {
        let cid = spec.content_id;
        if let Some(p) = self.registered(&cid) {
            p.same_geometry(spec)?;
            return Ok(Registered::Partial(p));
        }
        let _g = lock(&self.open_lock);
        // Checked again under the lock: another thread may have registered it meanwhile,
        // or finished it (a finished download is renamed before it is unregistered).
        if let Some(p) = self.registered(&cid) {
            p.same_geometry(spec)?;
            return Ok(Registered::Partial(p));
        }
        if let Ok(meta) = fs::metadata(self.blob_path(&cid)) {
            self.check_blob_size(spec, &meta)?;
            return Ok(Registered::Blob);
        }
        spec.check().map_err(|e| StoreError::InvalidSpec {
            file: cid,
            reason: e.to_string(),
        })?;
        let count = spec_chunk_count(spec)?;
        let p = Arc::new(self.load_partial(spec, count)?);
        lock(&self.partials).insert(cid, Arc::clone(&p));
        Ok(Registered::Partial(p))
    }

    /// Open (creating if needed) the `.part` file of `spec` and load its durable record.
    fn load_partial(&self, spec: &FileSpec, count: u32) -> Result<Partial> {
        let cid = spec.content_id;
        let part_path = self.part_path(&cid);
        let have_name = Self::have_name(&cid);
        let have_path = self.partial.join(&have_name);
        let mut durable = Bitfield::new(count);
        let mut discard = false;
        match fs::read(&have_path) {
            Ok(bytes) => match decode_record(&bytes, spec, count) {
                Ok(bits) => durable = bits,
                Err(why) => {
                    tracing::warn!(file = %cid, %why, "discarding chunk record");
                    discard = true;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&have_path, e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .map_err(|e| io_error(&part_path, e))?;
        let len = file.metadata().map_err(|e| io_error(&part_path, e))?.len();
        if len != spec.size {
            if durable.count() > 0 {
                tracing::warn!(file = %cid, len, size = spec.size, "partial file has the wrong size; discarding its chunk record");
                durable = Bitfield::new(count);
                discard = true;
            }
            file.set_len(spec.size)
                .map_err(|e| io_error(&part_path, e))?;
        }
        if discard {
            // Durably gone before any chunk is written over the bytes it described.
            self.remove_durably(&self.partial, &have_path)?;
        }
        Ok(Partial {
            spec: spec.clone(),
            count,
            part_path,
            have_name,
            file,
            closed: RwLock::new(false),
            sync_lock: Mutex::new(()),
            bits: Mutex::new(Bits {
                durable,
                pending: BTreeSet::new(),
                unreported: BTreeSet::new(),
            }),
        })
    }

    /// Register the file `spec` for download and return which of its chunks are durable:
    /// all of them if its blob exists, else those named by its durable record (chunks
    /// written but not yet synced are not included). Creates the `.part` file (sparse, at
    /// the file's size) if needed. Idempotent; cheap once registered.
    ///
    /// The spec is checked (its chaining values must combine to its content id) when a
    /// download is registered; chunks are then verified against the spec registered first.
    /// Errors: [`StoreError::InvalidSpec`], [`StoreError::SpecMismatch`] when the content id
    /// is registered with another size or chunk size, [`StoreError::BlobSize`] when the blob
    /// exists with another size, I/O errors.
    pub fn open_file(&self, spec: &FileSpec) -> Result<Bitfield> {
        match self.register(spec)? {
            Registered::Blob => Ok(Bitfield::full(spec_chunk_count(spec)?)),
            Registered::Partial(p) => Ok(lock(&p.bits).durable.clone()),
        }
    }

    /// Verify chunk `index` of `spec` and write it at its offset into the download's
    /// `.part` file (registering the download as [`Store::open_file`] does if needed).
    ///
    /// The chunk is verified first, length then hash, against the registered spec: a chunk
    /// that fails is never written and gives [`StoreError::Corrupt`] (penalise its sender;
    /// no other error of this method is `Corrupt`). A verified chunk is then written and
    /// recorded as *pending*: it is not durable, not reported by [`Store::open_file`] and
    /// not served by [`Store::read_chunk`] until a sync returns it.
    ///
    /// Every `Ok` is answered by a later successful [`Store::sync`] / [`Store::sync_all`]
    /// returning this index once it is durable, so a driver can wait for each chunk it
    /// wrote. A chunk that is already durable (or the file already complete) is verified,
    /// not written again, and reported by the next sync; a chunk already pending is
    /// reported once, when it becomes durable. A failed write (for instance
    /// [`StoreError::DiskFull`]) records nothing. [`StoreError::UnknownFile`] if the
    /// download was removed ([`Store::gc`]) while this ran.
    pub fn write_chunk(&self, spec: &FileSpec, index: u32, data: &[u8]) -> Result<()> {
        let cid = spec.content_id;
        let bad = |e| StoreError::Corrupt(format!("chunk {index} of {}: {e}", cid.to_hex()));
        let p = match self.register(spec)? {
            Registered::Blob => {
                spec.verify_chunk(u64::from(index), data).map_err(bad)?;
                self.report_complete(cid, [index]);
                return Ok(());
            }
            Registered::Partial(p) => p,
        };
        p.spec.verify_chunk(u64::from(index), data).map_err(bad)?;
        let closed = read_lock(&p.closed);
        if *closed {
            // Finished or removed meanwhile.
            return if self.has_blob(&cid) {
                self.report_complete(cid, [index]);
                Ok(())
            } else {
                Err(StoreError::UnknownFile(cid))
            };
        }
        {
            let mut bits = lock(&p.bits);
            if bits.durable.get(index) {
                bits.unreported.insert(index);
                return Ok(());
            }
            if bits.pending.contains(&index) {
                return Ok(());
            }
        }
        p.file
            .write_all_at(data, p.spec.chunk_offset(u64::from(index)))
            .map_err(|e| io_error(&p.part_path, e))?;
        lock(&p.bits).pending.insert(index);
        Ok(())
    }

    /// Remember chunks of a complete file to report at the next sync.
    fn report_complete(&self, cid: ContentId, indices: impl IntoIterator<Item = u32>) {
        let mut done = lock(&self.complete_reports);
        let set = done.entry(cid).or_default();
        set.extend(indices);
        if set.is_empty() {
            done.remove(&cid);
        }
    }

    /// Take the chunks of `cid` to report: those of its download (if registered) and those
    /// remembered for a complete file (dropped if the blob is gone).
    fn take_reports(&self, cid: &ContentId, p: Option<&Partial>) -> Vec<u32> {
        let mut out: BTreeSet<u32> = match p {
            Some(p) => std::mem::take(&mut lock(&p.bits).unreported),
            None => BTreeSet::new(),
        };
        let done = lock(&self.complete_reports).remove(cid);
        if let Some(done) = done
            && self.has_blob(cid)
        {
            out.extend(done);
        }
        out.into_iter().collect()
    }

    /// Make the pending chunks of one download durable: fsync its `.part` file, then write
    /// its record with them (atomically, see the module docs). Returns, in increasing
    /// order, the chunk indices to count as present from now on: those that just became
    /// durable, plus any not yet returned (see [`Store::write_chunk`] and
    /// [`Store::sync_all`]). Only after a sync returns a chunk may the node count and
    /// announce it. Nothing pending: no I/O.
    ///
    /// On error nothing became durable: the chunks stay pending, a later sync retries and
    /// nothing is lost from the reports. A complete file returns what is left to report
    /// (usually nothing); a file neither registered nor complete is
    /// [`StoreError::UnknownFile`].
    pub fn sync(&self, file: &ContentId) -> Result<Vec<u32>> {
        match self.registered(file) {
            Some(p) => {
                self.sync_partial(&p)?;
                Ok(self.take_reports(file, Some(&p)))
            }
            None if self.has_blob(file) => Ok(self.take_reports(file, None)),
            None => {
                lock(&self.complete_reports).remove(file);
                Err(StoreError::UnknownFile(*file))
            }
        }
    }

    /// fsync the `.part` file and write the record with the pending chunks; they move from
    /// `pending` to `durable` and `unreported`.
    fn sync_partial(&self, p: &Partial) -> Result<()> {
        let closed = read_lock(&p.closed);
        if *closed {
            return Ok(());
        }
        let _s = lock(&p.sync_lock);
        // Every chunk in this snapshot finished its write before it was marked pending, so
        // the fsync below covers it. `durable` changes only under `sync_lock`.
        let (batch, mut next) = {
            let bits = lock(&p.bits);
            if bits.pending.is_empty() {
                return Ok(());
            }
            (
                bits.pending.iter().copied().collect::<Vec<u32>>(),
                bits.durable.clone(),
            )
        };
        p.file.sync_data().map_err(|e| io_error(&p.part_path, e))?;
        for &i in &batch {
            next.set(i);
        }
        let record = encode_record(&p.spec, p.count, &next);
        self.write_atomic(&self.partial, &p.have_name, &record)?;
        let mut bits = lock(&p.bits);
        bits.durable = next;
        for i in batch {
            bits.pending.remove(&i);
            bits.unreported.insert(i);
        }
        drop(closed);
        Ok(())
    }

    /// [`Store::sync`] every registered download (one fsync and one record write per
    /// download with pending chunks). Returns, per file with something to report, the
    /// chunk indices to count as present from now on, in content id order.
    ///
    /// If any download fails to sync, the first error is returned after the others were
    /// synced; what did become durable is not lost but returned by the next successful
    /// `sync_all` (or `sync` of that file), together with the chunks that were retried.
    pub fn sync_all(&self) -> Result<Vec<(ContentId, Vec<u32>)>> {
        let all: Vec<(ContentId, Arc<Partial>)> = lock(&self.partials)
            .iter()
            .map(|(c, p)| (*c, Arc::clone(p)))
            .collect();
        let mut first_err = None;
        for (_, p) in &all {
            if let Err(e) = self.sync_partial(p) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let mut files: BTreeSet<ContentId> = all.iter().map(|(c, _)| *c).collect();
        files.extend(lock(&self.complete_reports).keys().copied());
        let mut out = Vec::new();
        for cid in files {
            let p = all.iter().find(|(c, _)| *c == cid).map(|(_, p)| &**p);
            let indices = self.take_reports(&cid, p);
            if !indices.is_empty() {
                out.push((cid, indices));
            }
        }
        Ok(out)
    }

    /// Complete a download whose chunks are all durable: fsync the `.part` file, rename it
    /// to `blobs/<content-id-hex>`, fsync `blobs/`, unregister the download and remove its
    /// record. Returns the blob path. Chunks it does not sync: pending ones count as
    /// missing.
    ///
    /// [`StoreError::Incomplete`] if a chunk is not durable (nothing changes). Idempotent: a
    /// file whose blob exists returns its path. Waits for writes and syncs of this file in
    /// progress; later ones find the blob. Chunks durable but not yet returned by a sync are
    /// still returned by the next one.
    pub fn finish(&self, spec: &FileSpec) -> Result<PathBuf> {
        let cid = spec.content_id;
        let blob = self.blob_path(&cid);
        let Some(p) = self.registered(&cid) else {
            return match fs::metadata(&blob) {
                Ok(meta) => self.check_blob_size(spec, &meta).map(|()| blob),
                Err(_) => Err(StoreError::UnknownFile(cid)),
            };
        };
        p.same_geometry(spec)?;
        let mut closed = write_lock(&p.closed);
        if *closed {
            return if self.has_blob(&cid) {
                Ok(blob)
            } else {
                Err(StoreError::UnknownFile(cid))
            };
        }
        let durable = lock(&p.bits).durable.count();
        if durable < p.count {
            return Err(StoreError::Incomplete {
                file: cid,
                durable,
                total: p.count,
            });
        }
        // Every chunk was fsynced by the sync that made it durable; this one is cheap and
        // covers the file's metadata.
        p.file.sync_all().map_err(|e| io_error(&p.part_path, e))?;
        fs::rename(&p.part_path, &blob).map_err(|e| io_error(&blob, e))?;
        sync_dir(&self.blobs)?;
        *closed = true;
        self.close_reports(&cid, &p);
        self.unregister(&cid, &p);
        drop(closed);
        // Not durable, and need not be: `open` removes a record whose blob exists.
        let have_path = self.partial.join(&p.have_name);
        if let Err(e) = fs::remove_file(&have_path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %have_path.display(), error = %e, "could not remove chunk record");
        }
        Ok(blob)
    }

    /// A download became a blob: what it had left to report is reported for the blob.
    fn close_reports(&self, cid: &ContentId, p: &Partial) {
        let mut bits = lock(&p.bits);
        let left = std::mem::take(&mut bits.unreported);
        // Pending chunks were written: the blob has them.
        let pending = std::mem::take(&mut bits.pending);
        drop(bits);
        self.report_complete(*cid, left.into_iter().chain(pending));
    }

    /// Remove `p` from the registry if it is still the entry for `cid`.
    fn unregister(&self, cid: &ContentId, p: &Arc<Partial>) {
        let mut map = lock(&self.partials);
        if map.get(cid).is_some_and(|q| Arc::ptr_eq(q, p)) {
            map.remove(cid);
        }
    }

    /// Close and unregister the download of `cid`, if registered, and delete its files.
    /// With `completed` (its blob now exists), its unreported chunks are still reported.
    /// Returns the bytes freed.
    fn drop_partial(&self, cid: &ContentId, completed: bool) -> u64 {
        if let Some(p) = self.registered(cid) {
            let mut closed = write_lock(&p.closed);
            *closed = true;
            if completed {
                self.close_reports(cid, &p);
            }
            self.unregister(cid, &p);
        }
        if !completed {
            lock(&self.complete_reports).remove(cid);
        }
        let mut freed = 0;
        for path in [self.part_path(cid), self.partial.join(Self::have_name(cid))] {
            freed += remove_counting(&path);
        }
        freed
    }

    /// Read chunk `index` of `spec`: exactly `chunk_len` bytes, from the download's `.part`
    /// file if that chunk is durable, else from the blob. One allocation of one chunk.
    ///
    /// [`StoreError::NotPresent`] if the download is registered but the chunk is not
    /// durable (or the index is out of range), [`StoreError::UnknownFile`] if there is
    /// neither a registered download nor a blob, [`StoreError::BlobSize`] if the blob's size
    /// disagrees with the spec.
    pub fn read_chunk(&self, spec: &FileSpec, index: u32) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_chunk_into(spec, index, &mut buf, 0)?;
        Ok(buf)
    }

    /// [`Store::read_chunk`] into `buf` from byte `at`: `buf` grows (zeroed) only if it is
    /// shorter than `at` plus the chunk, so a buffer used again is not zeroed again.
    /// Returns the chunk's length. The uploader reads into pooled buffers, with the
    /// frame's length and header in front of the chunk.
    pub fn read_chunk_into(
        &self,
        spec: &FileSpec,
        index: u32,
        buf: &mut Vec<u8>,
        at: usize,
    ) -> Result<usize> {
        let cid = spec.content_id;
        let not_present = StoreError::NotPresent { file: cid, index };
        let Ok(len) = spec.chunk_len(u64::from(index)) else {
            return Err(not_present);
        };
        let len = len as usize;
        let offset = spec.chunk_offset(u64::from(index));
        if buf.len() < at + len {
            buf.reserve_exact(at + len - buf.len());
            buf.resize(at + len, 0);
        }
        let dst = &mut buf[at..at + len];
        if let Some(p) = self.registered(&cid) {
            let closed = read_lock(&p.closed);
            if !*closed {
                p.same_geometry(spec)?;
                if !lock(&p.bits).durable.get(index) {
                    return Err(not_present);
                }
                p.file
                    .read_exact_at(dst, offset)
                    .map_err(|e| io_error(&p.part_path, e))?;
                return Ok(len);
            }
        }
        let path = self.blob_path(&cid);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::UnknownFile(cid));
            }
            Err(e) => return Err(io_error(&path, e)),
        };
        let meta = f.metadata().map_err(|e| io_error(&path, e))?;
        self.check_blob_size(spec, &meta)?;
        f.read_exact_at(dst, offset)
            .map_err(|e| io_error(&path, e))?;
        Ok(len)
    }

    // ----- imports -----

    /// Publisher side: copy the file at `src` into the store as the blob of `spec`, hashing
    /// it while copying (1 MiB buffers, never the whole file in memory). Refuses with
    /// [`StoreError::ContentMismatch`] (nothing stored) if the bytes' content id is not
    /// `spec.content_id`, and with [`StoreError::InvalidSpec`] if it is but the spec's size
    /// or chaining values are wrong (the blob, whose bytes are genuine, is kept). Atomic like
    /// [`Store::finish`]: temporary file in `blobs/`, fsync, rename, fsync `blobs/`. If the
    /// blob already exists, `src` is only hashed and checked. A download of the same file in
    /// progress is dropped. Returns the blob path.
    pub fn import_file(&self, src: &Path, spec: &FileSpec) -> Result<PathBuf> {
        let f = File::open(src).map_err(|e| io_error(src, e))?;
        let (got, path) = self.import(f, spec.chunk_size, Some(&spec.content_id), |e| {
            io_error(src, e)
        })?;
        if got != *spec {
            // Same content id, other size or chaining values: the spec itself is wrong, and
            // the blob (whose bytes are what they are) stays.
            return Err(StoreError::InvalidSpec {
                file: spec.content_id,
                reason: format!(
                    "the file has {} bytes and other chaining values than the spec ({} bytes)",
                    got.size, spec.size
                ),
            });
        }
        Ok(path)
    }

    /// Import from a reader (an HTTP upload body): stream it into a temporary file in
    /// `blobs/` while hashing it at `chunk_size`, refuse with
    /// [`StoreError::ContentMismatch`] (nothing stored) if `expected` is given and differs,
    /// else fsync, rename into `blobs/` and fsync `blobs/`. Returns the file's spec and blob
    /// path. A read error of `r` is [`StoreError::Input`]. The input is not bounded here:
    /// callers taking untrusted input cap it (e.g. `Read::take` plus an `expected` id).
    pub fn import_reader(
        &self,
        r: impl Read,
        chunk_size: ChunkSize,
        expected: Option<&ContentId>,
    ) -> Result<(FileSpec, PathBuf)> {
        self.import(r, chunk_size, expected, StoreError::Input)
    }

    fn import(
        &self,
        mut r: impl Read,
        chunk_size: ChunkSize,
        expected: Option<&ContentId>,
        read_err: impl Fn(io::Error) -> StoreError,
    ) -> Result<(FileSpec, PathBuf)> {
        // When the blob is known to exist, only hash (and check) the input.
        let known = expected.filter(|c| self.has_blob(c));
        let mut sink = match known {
            Some(_) => None,
            None => {
                let tmp = self.temp_path(&self.blobs, "import");
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(|e| io_error(&tmp, e))?;
                Some((f, TempGuard::new(tmp.clone()), tmp))
            }
        };
        let mut hasher = FileHasher::new(chunk_size);
        let mut buf = vec![0u8; IMPORT_BUF];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(e)),
            };
            hasher.update(&buf[..n]);
            if let Some((f, _, tmp)) = &mut sink {
                f.write_all(&buf[..n]).map_err(|e| io_error(tmp, e))?;
            }
        }
        let spec = hasher.finish();
        let cid = spec.content_id;
        if let Some(expected) = expected
            && *expected != cid
        {
            return Err(StoreError::ContentMismatch {
                expected: *expected,
                got: cid,
                got_size: spec.size,
            });
        }
        let blob = self.blob_path(&cid);
        if let Some((f, guard, tmp)) = sink {
            if self.has_blob(&cid) {
                // Someone stored it meanwhile; the temporary file goes with its guard.
                drop(guard);
                self.drop_partial(&cid, true);
                return Ok((spec, blob));
            }
            f.sync_all().map_err(|e| io_error(&tmp, e))?;
            drop(f);
            fs::rename(&tmp, &blob).map_err(|e| io_error(&blob, e))?;
            guard.disarm();
            sync_dir(&self.blobs)?;
        }
        self.drop_partial(&cid, true);
        Ok((spec, blob))
    }

    // ----- space -----

    /// Delete every blob and download whose content id is not in `keep`; returns the bytes
    /// freed (allocated on disk). Downloads being deleted are unregistered first: later
    /// writes to them give [`StoreError::UnknownFile`]. Imports in progress (temporary
    /// files) and files with foreign names are left alone. Deletions are not fsynced: a
    /// crash may bring back a deleted file, never a damaged one.
    pub fn gc(&self, keep: &BTreeSet<ContentId>, grace: std::time::Duration) -> Result<u64> {
        // Files written within `grace` are spared: the keep set was computed a moment ago
        // and may not know a file imported or registered since (a publish in progress).
        let fresh = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < grace)
        };
        let keep_partial = |cid: &ContentId| keep.contains(cid) || fresh(&self.part_path(cid));
        let mut freed = 0;
        for (name, path) in list_dir(&self.blobs)? {
            if let Ok(cid) = name.parse::<ContentId>()
                && !keep.contains(&cid)
                && !fresh(&path)
            {
                freed += remove_counting(&path);
            }
        }
        lock(&self.complete_reports).retain(|c, _| keep.contains(c));
        // No download is registered while this runs, so none is deleted under its feet.
        let _g = lock(&self.open_lock);
        let doomed: Vec<ContentId> = lock(&self.partials)
            .keys()
            .filter(|c| !keep_partial(c))
            .copied()
            .collect();
        for cid in &doomed {
            freed += self.drop_partial(cid, false);
        }
        for (name, path) in list_dir(&self.partial)? {
            if let Some((cid, _)) = parse_partial_name(&name)
                && !keep_partial(&cid)
            {
                freed += remove_counting(&path);
            }
        }
        Ok(freed)
    }

    /// Bytes of complete files in `blobs/` that are neither in `keep` nor `except` (the
    /// upload quota's measure: files waiting for a manifest, or for collection).
    pub fn unreferenced_bytes(
        &self,
        keep: &BTreeSet<ContentId>,
        except: &ContentId,
    ) -> Result<u64> {
        let mut total = 0u64;
        for (name, path) in list_dir(&self.blobs)? {
            if let Ok(cid) = name.parse::<ContentId>()
                && !keep.contains(&cid)
                && cid != *except
                && let Ok(meta) = fs::symlink_metadata(&path)
            {
                total = total.saturating_add(meta.len());
            }
        }
        Ok(total)
    }

    /// Bytes the store occupies on disk (allocated blocks): blobs, downloads, manifests,
    /// trust roots and `state.json`.
    pub fn disk_usage(&self) -> Result<u64> {
        let mut total = 0u64;
        for d in [&self.blobs, &self.partial, &self.manifests, &self.trust] {
            for (_, path) in list_dir(d)? {
                if let Ok(meta) = fs::symlink_metadata(&path) {
                    total = total.saturating_add(allocated(&meta));
                }
            }
        }
        if let Ok(meta) = fs::symlink_metadata(self.dir.join(STATE)) {
            total = total.saturating_add(allocated(&meta));
        }
        Ok(total)
    }
}

/// Parse `<hex>.part` / `<hex>.have`: the content id and whether it is a record.
fn parse_partial_name(name: &str) -> Option<(ContentId, bool)> {
    if let Some(hex) = name.strip_suffix(PART_EXT) {
        return hex.parse().ok().map(|c| (c, false));
    }
    let hex = name.strip_suffix(HAVE_EXT)?;
    hex.parse().ok().map(|c| (c, true))
}

/// The regular files of a directory (names and paths), skipping temporary files.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        out.push((name, entry.path()));
    }
    Ok(out)
}

/// Read a file, `None` if it does not exist (for instance removed since it was listed).
fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, e)),
    }
}

/// Remove a file, returning its allocated size (0 if it was not there or not removable).
fn remove_counting(path: &Path) -> u64 {
    let size = fs::symlink_metadata(path)
        .map(|m| allocated(&m))
        .unwrap_or(0);
    match fs::remove_file(path) {
        Ok(()) => size,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove file");
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_protocol::chunking::spec_for_bytes;

    const C: usize = 16 * 1024;

    fn cs() -> ChunkSize {
        ChunkSize::new(C as u64).unwrap()
    }

    /// Deterministic pseudo-random bytes.
    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        let mut out = vec![0u8; n];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn chunk(data: &[u8], i: usize) -> &[u8] {
        &data[(i * C).min(data.len())..((i + 1) * C).min(data.len())]
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(dir.path()).unwrap()
    }

    #[test]
    fn store_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
        assert_send_sync::<Arc<Store>>();
    }

    #[test]
    fn multi_chunk_roundtrip_from_threads() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(13 * C + 777, 1);
        let spec = spec_for_bytes(&data, cs());
        let n = spec.chunk_count() as usize;
        assert_eq!(n, 14);
        assert_eq!(store.open_file(&spec).unwrap().count(), 0);
        // Four threads, each writing its share of the chunks in reverse order.
        std::thread::scope(|s| {
            for t in 0..4 {
                let (store, spec, data) = (&store, &spec, &data);
                s.spawn(move || {
                    for i in (0..n).rev().filter(|i| i % 4 == t) {
                        store.write_chunk(spec, i as u32, chunk(data, i)).unwrap();
                    }
                });
            }
        });
        // Pending chunks are not reported yet.
        assert_eq!(store.open_file(&spec).unwrap().count(), 0);
        // Pending chunks do not count for finishing.
        assert!(matches!(
            store.finish(&spec),
            Err(StoreError::Incomplete { durable: 0, .. })
        ));
        let synced = store.sync(&spec.content_id).unwrap();
        assert_eq!(synced, (0..n as u32).collect::<Vec<_>>());
        store.finish(&spec).unwrap();
        let blob = store.blob_path(&spec.content_id);
        assert!(store.has_blob(&spec.content_id));
        let on_disk = fs::read(&blob).unwrap();
        assert_eq!(
            blake3::hash(&on_disk).as_bytes(),
            spec.content_id.as_bytes()
        );
        assert_eq!(on_disk, data);
        assert_eq!(store.open_file(&spec).unwrap(), Bitfield::full(n as u32));
        // The download's files are gone; finish again is idempotent.
        assert!(!store.part_path(&spec.content_id).exists());
        assert!(
            !store
                .partial
                .join(Store::have_name(&spec.content_id))
                .exists()
        );
        assert_eq!(store.finish(&spec).unwrap(), blob);
        // Late duplicate chunks after completion are accepted, change nothing, and are
        // reported by the next sync.
        store.write_chunk(&spec, 3, chunk(&data, 3)).unwrap();
        assert_eq!(fs::read(&blob).unwrap(), data);
        assert_eq!(store.sync_all().unwrap(), vec![(spec.content_id, vec![3])]);
        assert!(store.sync_all().unwrap().is_empty());
    }

    #[test]
    fn sync_returns_new_chunks_once_then_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(3 * C, 2);
        let spec = spec_for_bytes(&data, cs());
        store.open_file(&spec).unwrap();
        store.write_chunk(&spec, 2, chunk(&data, 2)).unwrap();
        store.write_chunk(&spec, 0, chunk(&data, 0)).unwrap();
        assert_eq!(store.sync(&spec.content_id).unwrap(), vec![0, 2]);
        assert_eq!(store.sync(&spec.content_id).unwrap(), Vec::<u32>::new());
        assert!(matches!(
            store.finish(&spec),
            Err(StoreError::Incomplete {
                durable: 2,
                total: 3,
                ..
            })
        ));
        store.write_chunk(&spec, 1, chunk(&data, 1)).unwrap();
        store.write_chunk(&spec, 1, chunk(&data, 1)).unwrap();
        // Duplicate write of a durable chunk: not written again, reported again.
        store.write_chunk(&spec, 0, chunk(&data, 0)).unwrap();
        assert_eq!(
            store.sync_all().unwrap(),
            vec![(spec.content_id, vec![0, 1])]
        );
        assert!(store.sync_all().unwrap().is_empty());
        let blob = store.finish(&spec).unwrap();
        assert_eq!(fs::read(blob).unwrap(), data);
        assert_eq!(store.sync(&spec.content_id).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn failed_sync_loses_no_report() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let a = bytes(2 * C, 20);
        let b = bytes(2 * C, 21);
        let (sa, sb) = (spec_for_bytes(&a, cs()), spec_for_bytes(&b, cs()));
        store.open_file(&sa).unwrap();
        store.open_file(&sb).unwrap();
        store.write_chunk(&sa, 0, chunk(&a, 0)).unwrap();
        store.write_chunk(&sb, 1, chunk(&b, 1)).unwrap();
        // A's record cannot be replaced (a directory is in the way); B's can.
        let blocker = store.partial.join(Store::have_name(&sa.content_id));
        fs::create_dir(&blocker).unwrap();
        assert!(matches!(store.sync_all(), Err(StoreError::Io { .. })));
        assert!(matches!(
            store.sync(&sa.content_id),
            Err(StoreError::Io { .. })
        ));
        // B's chunk became durable but was not returned; A's is still pending.
        assert!(matches!(
            store.read_chunk(&sa, 0),
            Err(StoreError::NotPresent { .. })
        ));
        assert_eq!(store.read_chunk(&sb, 1).unwrap(), chunk(&b, 1));
        fs::remove_dir(&blocker).unwrap();
        assert_eq!(
            store.sync_all().unwrap(),
            vec![(sa.content_id, vec![0]), (sb.content_id, vec![1])]
                .into_iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert!(store.sync_all().unwrap().is_empty());
    }

    #[test]
    fn corrupt_chunk_refused_and_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(4 * C, 3);
        let spec = spec_for_bytes(&data, cs());
        store.open_file(&spec).unwrap();
        let mut bad = chunk(&data, 1).to_vec();
        bad[5] ^= 0x10;
        assert!(matches!(
            store.write_chunk(&spec, 1, &bad),
            Err(StoreError::Corrupt(_))
        ));
        // Right bytes at the wrong index, wrong length, out of range: all refused.
        assert!(matches!(
            store.write_chunk(&spec, 2, chunk(&data, 1)),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.write_chunk(&spec, 1, &chunk(&data, 1)[1..]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.write_chunk(&spec, 9, chunk(&data, 1)),
            Err(StoreError::Corrupt(_))
        ));
        // Nothing pending, nothing on disk.
        assert!(store.sync(&spec.content_id).unwrap().is_empty());
        let part = fs::read(store.part_path(&spec.content_id)).unwrap();
        assert_eq!(part.len(), data.len());
        assert!(part.iter().all(|&b| b == 0));
        assert!(matches!(
            store.read_chunk(&spec, 1),
            Err(StoreError::NotPresent { index: 1, .. })
        ));
    }

    #[test]
    fn unsynced_chunks_not_reported_after_crash_synced_ones_are() {
        let dir = tempfile::tempdir().unwrap();
        let data = bytes(5 * C + 10, 4);
        let spec = spec_for_bytes(&data, cs());
        {
            let store = open(&dir);
            store.open_file(&spec).unwrap();
            store.write_chunk(&spec, 0, chunk(&data, 0)).unwrap();
            store.write_chunk(&spec, 5, chunk(&data, 5)).unwrap();
            assert_eq!(store.sync(&spec.content_id).unwrap(), vec![0, 5]);
            store.write_chunk(&spec, 1, chunk(&data, 1)).unwrap();
            store.write_chunk(&spec, 3, chunk(&data, 3)).unwrap();
            // Crash: dropped without sync.
        }
        let store = open(&dir);
        let have = store.open_file(&spec).unwrap();
        assert_eq!(have.len(), 6);
        assert_eq!(have.count(), 2);
        assert!(have.get(0) && have.get(5));
        assert!(!have.get(1) && !have.get(3));
        assert_eq!(store.read_chunk(&spec, 5).unwrap(), chunk(&data, 5));
        assert!(matches!(
            store.read_chunk(&spec, 1),
            Err(StoreError::NotPresent { .. })
        ));
        // Resume and complete.
        for i in [1, 2, 3, 4] {
            store
                .write_chunk(&spec, i, chunk(&data, i as usize))
                .unwrap();
        }
        assert_eq!(store.sync(&spec.content_id).unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(fs::read(store.finish(&spec).unwrap()).unwrap(), data);
    }

    #[test]
    fn record_never_ahead_of_data() {
        let dir = tempfile::tempdir().unwrap();
        let data = bytes(3 * C, 5);
        let spec = spec_for_bytes(&data, cs());
        let part;
        {
            let store = open(&dir);
            store.open_file(&spec).unwrap();
            store.write_chunk(&spec, 0, chunk(&data, 0)).unwrap();
            assert_eq!(store.sync(&spec.content_id).unwrap(), vec![0]);
            store.write_chunk(&spec, 1, chunk(&data, 1)).unwrap();
            part = store.part_path(&spec.content_id);
        }
        // The unsynced chunk's bytes are damaged (as a crash could leave them).
        let f = OpenOptions::new().write(true).open(&part).unwrap();
        f.write_all_at(&[0xAB; 100], C as u64 + 7).unwrap();
        drop(f);
        let store = open(&dir);
        let have = store.open_file(&spec).unwrap();
        assert!(have.get(0));
        assert!(!have.get(1));
        assert_eq!(have.count(), 1);
        assert_eq!(store.read_chunk(&spec, 0).unwrap(), chunk(&data, 0));
    }

    #[test]
    fn damaged_or_orphan_records_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let data = bytes(3 * C, 6);
        let spec = spec_for_bytes(&data, cs());
        let have_path;
        {
            let store = open(&dir);
            store.open_file(&spec).unwrap();
            store.write_chunk(&spec, 2, chunk(&data, 2)).unwrap();
            store.sync(&spec.content_id).unwrap();
            have_path = store.partial.join(Store::have_name(&spec.content_id));
        }
        let mut rec = fs::read(&have_path).unwrap();
        let last = rec.len() - 40;
        rec[last] ^= 1;
        fs::write(&have_path, &rec).unwrap();
        {
            let store = open(&dir);
            assert_eq!(store.open_file(&spec).unwrap().count(), 0);
            assert!(!have_path.exists());
        }
        // A record without its data file is removed at open.
        fs::write(&have_path, b"whatever").unwrap();
        fs::remove_file(
            dir.path()
                .join(PARTIAL)
                .join(format!("{}{PART_EXT}", spec.content_id.to_hex())),
        )
        .unwrap();
        let store = open(&dir);
        assert!(!have_path.exists());
        assert_eq!(store.open_file(&spec).unwrap().count(), 0);
    }

    #[test]
    fn leftover_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(&dir));
        let leftovers = [
            dir.path().join(".tmp-1-0-state.json"),
            dir.path().join(BLOBS).join(".tmp-1-1-import"),
            dir.path().join(PARTIAL).join(".tmp-1-2-x.have"),
            dir.path().join(MANIFESTS).join(".tmp-1-3-y.manifest"),
            dir.path().join(TRUST).join(".tmp-1-4-root-1.pollen"),
        ];
        for p in &leftovers {
            fs::write(p, b"half written").unwrap();
        }
        let store = open(&dir);
        for p in &leftovers {
            assert!(!p.exists(), "{}", p.display());
        }
        assert!(store.manifests().unwrap().is_empty());
        assert!(store.trust_roots().unwrap().is_empty());
        assert_eq!(store.load_state().unwrap(), NodeState::default());
    }

    #[test]
    fn import_file_checks_spec() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(5 * C + 3, 7);
        let spec = spec_for_bytes(&data, cs());
        let src = dir.path().join("model.onnx");
        fs::write(&src, &data).unwrap();
        // A spec of other bytes: refused, nothing stored, no temp file left.
        let other = spec_for_bytes(&bytes(5 * C + 3, 8), cs());
        assert!(matches!(
            store.import_file(&src, &other),
            Err(StoreError::ContentMismatch { got, .. }) if got == spec.content_id
        ));
        assert!(!store.has_blob(&other.content_id));
        assert!(!store.has_blob(&spec.content_id));
        assert!(list_dir(&store.blobs).unwrap().is_empty());
        assert!(fs::read_dir(&store.blobs).unwrap().next().is_none());
        // The right spec: stored.
        let path = store.import_file(&src, &spec).unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        assert_eq!(store.read_chunk(&spec, 5).unwrap(), chunk(&data, 5));
        // Again, with the blob present: only checked.
        assert_eq!(store.import_file(&src, &spec).unwrap(), path);
        let mut wrong = data.clone();
        wrong[0] ^= 1;
        fs::write(&src, &wrong).unwrap();
        assert!(matches!(
            store.import_file(&src, &spec),
            Err(StoreError::ContentMismatch { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), data);
        // A missing source is an I/O error naming it.
        assert!(matches!(
            store.import_file(&dir.path().join("nope"), &spec),
            Err(StoreError::Io { .. })
        ));
    }

    #[test]
    fn import_reader_checks_expected_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(2 * C + 100, 9);
        let want = spec_for_bytes(&data, cs());
        let wrong = ContentId([7; 32]);
        assert!(matches!(
            store.import_reader(&data[..], cs(), Some(&wrong)),
            Err(StoreError::ContentMismatch { expected, got, got_size })
                if expected == wrong && got == want.content_id && got_size == data.len() as u64
        ));
        assert!(fs::read_dir(&store.blobs).unwrap().next().is_none());
        let (spec, path) = store
            .import_reader(&data[..], cs(), Some(&want.content_id))
            .unwrap();
        assert_eq!(spec, want);
        assert_eq!(fs::read(&path).unwrap(), data);
        // Without an expected id.
        let other = bytes(C / 2, 10);
        let (spec2, path2) = store.import_reader(&other[..], cs(), None).unwrap();
        assert_eq!(spec2.content_id.0, *blake3::hash(&other).as_bytes());
        assert_eq!(fs::read(path2).unwrap(), other);

        // A broken input stores nothing.
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("connection reset"));
                }
                self.0 -= 1;
                buf[..10].fill(1);
                Ok(10)
            }
        }
        let before = list_dir(&store.blobs).unwrap().len();
        assert!(matches!(
            store.import_reader(Broken(3), cs(), None),
            Err(StoreError::Input(_))
        ));
        assert_eq!(fs::read_dir(&store.blobs).unwrap().count(), before);
    }

    #[test]
    fn import_drops_download_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(2 * C, 11);
        let spec = spec_for_bytes(&data, cs());
        store.open_file(&spec).unwrap();
        store.write_chunk(&spec, 0, chunk(&data, 0)).unwrap();
        store.sync(&spec.content_id).unwrap();
        store.import_reader(&data[..], cs(), None).unwrap();
        assert!(!store.part_path(&spec.content_id).exists());
        assert_eq!(store.open_file(&spec).unwrap(), Bitfield::full(2));
        assert_eq!(store.read_chunk(&spec, 1).unwrap(), chunk(&data, 1));
        // Writes to the dropped download find the blob, and are reported.
        store.write_chunk(&spec, 1, chunk(&data, 1)).unwrap();
        assert_eq!(store.sync(&spec.content_id).unwrap(), vec![1]);
    }

    #[test]
    fn gc_deletes_what_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let a = bytes(3 * C, 12);
        let b = bytes(2 * C, 13);
        let c = bytes(4 * C, 14);
        let (sa, _) = store.import_reader(&a[..], cs(), None).unwrap();
        let (sb, _) = store.import_reader(&b[..], cs(), None).unwrap();
        let sc = spec_for_bytes(&c, cs());
        store.open_file(&sc).unwrap();
        store.write_chunk(&sc, 0, chunk(&c, 0)).unwrap();
        store.sync(&sc.content_id).unwrap();
        let usage = store.disk_usage().unwrap();
        assert!(usage >= (a.len() + b.len() + C) as u64, "{usage}");

        let keep = BTreeSet::from([sa.content_id]);
        let freed = store.gc(&keep, std::time::Duration::ZERO).unwrap();
        assert!(freed >= (b.len() + C) as u64, "{freed}");
        assert!(store.has_blob(&sa.content_id));
        assert!(!store.has_blob(&sb.content_id));
        assert!(!store.part_path(&sc.content_id).exists());
        // Writing again registers a fresh download.
        store.write_chunk(&sc, 1, chunk(&c, 1)).unwrap();
        assert_eq!(store.open_file(&sc).unwrap().count(), 0);
        assert!(store.disk_usage().unwrap() < usage);
        assert!(
            store
                .gc(&BTreeSet::new(), std::time::Duration::ZERO)
                .unwrap()
                > 0
        );
        assert!(matches!(
            store.read_chunk(&sa, 0),
            Err(StoreError::UnknownFile(_))
        ));
        assert!(matches!(
            store.sync(&sc.content_id),
            Err(StoreError::UnknownFile(_))
        ));
    }

    #[test]
    fn control_state_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let m1 = ManifestId([1; 32]);
        let m2 = ManifestId([2; 32]);
        let state = NodeState {
            highest: BTreeMap::from([("vision.defects".to_string(), 7)]),
            active: BTreeMap::from([("vision.defects".to_string(), m1.to_hex())]),
            published: BTreeSet::from([m2.to_hex()]),
            pins: BTreeMap::from([("vision.defects".to_string(), 6)]),
            instructions: BTreeMap::from([("vision.defects@7".to_string(), "00ff".to_string())]),
            failed: BTreeMap::from([(
                m2.to_hex(),
                FailedActivation {
                    class: pollen_protocol::rollout::ErrorClass::LoadError,
                    detail: "too big".into(),
                },
            )]),
            interrupted: BTreeMap::from([(m1.to_hex(), 1)]),
        };
        {
            let store = open(&dir);
            assert_eq!(store.load_state().unwrap(), NodeState::default());
            store.save_state(&NodeState::default()).unwrap();
            store.save_state(&state).unwrap();
            store.save_manifest(&m2, b"second").unwrap();
            store.save_manifest(&m1, b"first").unwrap();
            store.save_manifest(&ManifestId([3; 32]), b"third").unwrap();
            store.remove_manifest(&ManifestId([3; 32])).unwrap();
            store.remove_manifest(&ManifestId([4; 32])).unwrap();
            store.save_trust_root(10, b"root ten").unwrap();
            store.save_trust_root(2, b"root two").unwrap();
            store.save_trust_root(1, b"root one").unwrap();
            // Foreign files are ignored.
            fs::write(store.manifests.join("README"), b"x").unwrap();
            fs::write(store.trust.join("root-x.pollen"), b"x").unwrap();
        }
        let store = open(&dir);
        assert_eq!(store.load_state().unwrap(), state);
        assert_eq!(
            store.manifests().unwrap(),
            vec![(m1, b"first".to_vec()), (m2, b"second".to_vec())]
        );
        assert_eq!(
            store.trust_roots().unwrap(),
            vec![
                b"root one".to_vec(),
                b"root two".to_vec(),
                b"root ten".to_vec()
            ]
        );
        // Unknown fields are ignored, missing ones default.
        fs::write(
            dir.path().join(STATE),
            br#"{"published": ["ab"], "future": 1}"#,
        )
        .unwrap();
        let loaded = store.load_state().unwrap();
        assert_eq!(loaded.published, BTreeSet::from(["ab".to_string()]));
        assert!(loaded.highest.is_empty());
        fs::write(dir.path().join(STATE), b"{not json").unwrap();
        assert!(matches!(store.load_state(), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn read_chunk_from_partial_and_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(2 * C + 5, 15);
        let spec = spec_for_bytes(&data, cs());
        assert!(matches!(
            store.read_chunk(&spec, 0),
            Err(StoreError::UnknownFile(_))
        ));
        store.open_file(&spec).unwrap();
        for i in 0..3 {
            store
                .write_chunk(&spec, i, chunk(&data, i as usize))
                .unwrap();
        }
        // Pending chunks are not served.
        assert!(matches!(
            store.read_chunk(&spec, 2),
            Err(StoreError::NotPresent { .. })
        ));
        store.sync(&spec.content_id).unwrap();
        let last = store.read_chunk(&spec, 2).unwrap();
        assert_eq!(last, chunk(&data, 2));
        assert_eq!(last.len(), 5);
        assert_eq!(last.capacity(), 5);
        assert!(matches!(
            store.read_chunk(&spec, 3),
            Err(StoreError::NotPresent { index: 3, .. })
        ));
        store.finish(&spec).unwrap();
        for i in 0..3 {
            assert_eq!(
                store.read_chunk(&spec, i).unwrap(),
                chunk(&data, i as usize)
            );
        }
        // A spec whose size disagrees with the blob: refused, not served.
        let mut lying = spec.clone();
        lying.size -= 1;
        assert!(matches!(
            store.read_chunk(&lying, 0),
            Err(StoreError::BlobSize { blob_size, spec_size, .. })
                if blob_size == spec.size && spec_size == spec.size - 1
        ));
        assert!(matches!(
            store.open_file(&lying),
            Err(StoreError::BlobSize { .. })
        ));
    }

    #[test]
    fn empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_for_bytes(&[], cs());
        {
            let store = open(&dir);
            let have = store.open_file(&spec).unwrap();
            assert_eq!((have.len(), have.count()), (1, 0));
            assert!(matches!(
                store.write_chunk(&spec, 0, &[0]),
                Err(StoreError::Corrupt(_))
            ));
            store.write_chunk(&spec, 0, &[]).unwrap();
            assert_eq!(store.sync(&spec.content_id).unwrap(), vec![0]);
            assert_eq!(store.read_chunk(&spec, 0).unwrap(), Vec::<u8>::new());
        }
        let store = open(&dir);
        assert_eq!(store.open_file(&spec).unwrap().count(), 1);
        let blob = store.finish(&spec).unwrap();
        assert_eq!(fs::metadata(&blob).unwrap().len(), 0);
        assert_eq!(store.read_chunk(&spec, 0).unwrap(), Vec::<u8>::new());
        let (s, p) = store
            .import_reader(io::empty(), cs(), Some(&spec.content_id))
            .unwrap();
        assert_eq!((s, p), (spec, blob));
    }

    #[test]
    fn one_chunk_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(1000, 16);
        let spec = spec_for_bytes(&data, cs());
        assert_eq!(spec.chunk_count(), 1);
        store.open_file(&spec).unwrap();
        let mut bad = data.clone();
        bad[999] ^= 1;
        assert!(matches!(
            store.write_chunk(&spec, 0, &bad),
            Err(StoreError::Corrupt(_))
        ));
        store.write_chunk(&spec, 0, &data).unwrap();
        assert_eq!(store.sync(&spec.content_id).unwrap(), vec![0]);
        let blob = store.finish(&spec).unwrap();
        assert_eq!(fs::read(blob).unwrap(), data);
        assert_eq!(store.read_chunk(&spec, 0).unwrap(), data);
    }

    #[test]
    fn invalid_and_conflicting_specs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let data = bytes(4 * C, 17);
        let spec = spec_for_bytes(&data, cs());
        let mut forged = spec.clone();
        forged.chaining_values[1][0] ^= 1;
        assert!(matches!(
            store.open_file(&forged),
            Err(StoreError::InvalidSpec { .. })
        ));
        assert!(!store.part_path(&spec.content_id).exists());
        store.open_file(&spec).unwrap();
        // Same content, another chunk size, while a download is registered.
        let big = spec_for_bytes(&data, ChunkSize::new(2 * C as u64).unwrap());
        assert!(matches!(
            store.open_file(&big),
            Err(StoreError::SpecMismatch { .. })
        ));
        // A forged spec cannot get bad bytes in once the real one is registered: chunks
        // are verified against the registered spec.
        let mut bad = chunk(&data, 1).to_vec();
        bad[0] ^= 1;
        let mut forged2 = spec.clone();
        forged2.chaining_values[1] = pollen_protocol::chunking::chunk_chaining_value(1, &bad, cs());
        assert!(matches!(
            store.write_chunk(&forged2, 1, &bad),
            Err(StoreError::Corrupt(_))
        ));
        // After a restart, a record of another chunk size is discarded, not misread.
        store.write_chunk(&spec, 0, chunk(&data, 0)).unwrap();
        store.sync(&spec.content_id).unwrap();
        drop(store);
        let store = open(&dir);
        assert_eq!(store.open_file(&big).unwrap().count(), 0);
    }

    #[test]
    fn disk_full_mapping() {
        let p = Path::new("/x");
        assert!(matches!(
            io_error(p, io::Error::from_raw_os_error(28)),
            StoreError::DiskFull { ref path, .. } if path == p
        ));
        assert!(matches!(
            io_error(p, io::Error::from_raw_os_error(122)),
            StoreError::DiskFull { .. }
        ));
        assert!(matches!(
            io_error(p, io::Error::from_raw_os_error(5)),
            StoreError::Io { .. }
        ));
        assert!(matches!(
            io_error(p, io::Error::from(io::ErrorKind::StorageFull)),
            StoreError::DiskFull { .. }
        ));
        assert!(matches!(
            io_error(p, io::Error::from(io::ErrorKind::NotFound)),
            StoreError::Io { .. }
        ));
    }

    #[test]
    fn record_encoding_roundtrip_and_rejects() {
        let data = bytes(11 * C, 18);
        let spec = spec_for_bytes(&data, cs());
        let mut bits = Bitfield::new(11);
        for i in [0, 3, 8, 10] {
            bits.set(i);
        }
        let rec = encode_record(&spec, 11, &bits);
        assert_eq!(decode_record(&rec, &spec, 11).unwrap(), bits);
        assert!(decode_record(&rec[..rec.len() - 1], &spec, 11).is_err());
        let other = spec_for_bytes(&bytes(11 * C, 19), cs());
        assert!(decode_record(&rec, &other, 11).is_err());
        let mut flipped = rec.clone();
        flipped[60] ^= 0x80;
        assert!(decode_record(&flipped, &spec, 11).is_err());
    }

    #[test]
    fn activation_markers_are_durable_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.activating().unwrap().is_empty());
        let (a, b) = (ManifestId([1; 32]), ManifestId([2; 32]));
        store.mark_activating(&b).unwrap();
        store.mark_activating(&a).unwrap();
        // A reopened store (a restart) still sees both.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.activating().unwrap(), vec![a, b]);
        store.clear_activating(&a).unwrap();
        store.clear_activating(&a).unwrap(); // twice is fine
        assert_eq!(store.activating().unwrap(), vec![b]);
    }
}
