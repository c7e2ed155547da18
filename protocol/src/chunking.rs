//! Content addressing: content ids, chunk layout and chunk verification.
//!
//! A file's content id is the BLAKE3 hash of the whole file. The file is cut into chunks of
//! `C` bytes (a power of two in [16 KiB, 16 MiB]); the last chunk may be shorter. For a file
//! of two or more chunks, each chunk's BLAKE3 *chaining value* (the hash of the chunk as a
//! non-root subtree at its input offset) is listed in the manifest: [`verify_chaining_values`]
//! checks once that the list combines to the content id, and [`FileSpec::verify_chunk`] then
//! checks each chunk on arrival (length first, then hash). A file of at most one chunk
//! (including the empty file) carries no chaining values and its one chunk is checked by
//! hashing it whole.
//!
//! Because `C` is a power of two of at least BLAKE3's 1 KiB chunk, every one of our chunks is
//! a complete, aligned BLAKE3 subtree, and the root is rebuilt by merging left-complete
//! subtrees exactly as BLAKE3 builds its tree.

use crate::ids::ContentId;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use serde::{Deserialize, Serialize};

/// Smallest allowed chunk size: 16 KiB.
pub const MIN_CHUNK_SIZE: u32 = 16 * 1024;
/// Largest allowed chunk size: 16 MiB.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

/// Errors of content addressing. Every one is a statement about bad input, never a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkingError {
    /// The chunk size is not a power of two in [16 KiB, 16 MiB].
    #[error("chunk size {0} is not a power of two between 16 KiB and 16 MiB")]
    InvalidChunkSize(u64),
    /// The number of chaining values does not match the file's size.
    #[error("expected {expected} chaining values, got {got}")]
    WrongChainingValueCount {
        /// What the size and chunk size imply.
        expected: u64,
        /// What was given.
        got: u64,
    },
    /// The chaining values do not combine to the content id.
    #[error("chaining values do not combine to the content id")]
    RootMismatch,
    /// A chunk index past the end of the file.
    #[error("chunk index {index} out of range (file has {count} chunks)")]
    IndexOutOfRange {
        /// The index asked for.
        index: u64,
        /// Chunks in the file.
        count: u64,
    },
    /// A chunk of the wrong length.
    #[error("chunk has {got} bytes, expected {expected}")]
    WrongLength {
        /// Bytes expected at this index.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// A chunk whose hash does not match.
    #[error("chunk hash mismatch")]
    HashMismatch,
}

/// A validated chunk size: a power of two in [16 KiB, 16 MiB].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ChunkSize(u32);

impl ChunkSize {
    /// The default, 1 MiB.
    pub const DEFAULT: ChunkSize = ChunkSize(DEFAULT_CHUNK_SIZE);

    /// Validate a chunk size in bytes.
    pub fn new(bytes: u64) -> Result<Self, ChunkingError> {
        if bytes.is_power_of_two()
            && (u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&bytes)
        {
            Ok(ChunkSize(bytes as u32))
        } else {
            Err(ChunkingError::InvalidChunkSize(bytes))
        }
    }

    /// Bytes per chunk.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Bytes per chunk, as u64.
    pub const fn bytes(self) -> u64 {
        self.0 as u64
    }
}

impl<'de> Deserialize<'de> for ChunkSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        ChunkSize::new(u64::from(v)).map_err(serde::de::Error::custom)
    }
}

/// Number of chunks of a file: `ceil(size / C)`, and 1 for the empty file.
pub fn chunk_count(size: u64, chunk_size: ChunkSize) -> u64 {
    if size == 0 {
        1
    } else {
        size.div_ceil(chunk_size.bytes())
    }
}

/// Number of chaining values a manifest lists for a file: 0 for at most one chunk.
pub fn expected_chaining_values(size: u64, chunk_size: ChunkSize) -> u64 {
    match chunk_count(size, chunk_size) {
        0 | 1 => 0,
        n => n,
    }
}

/// The chaining value of chunk `index` (bytes `data`) of a file cut at `chunk_size`.
///
/// Only meaningful for files of two or more chunks.
pub fn chunk_chaining_value(index: u64, data: &[u8], chunk_size: ChunkSize) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * chunk_size.bytes());
    h.update(data);
    h.finalize_non_root()
}

/// Largest power of two strictly below `n` (n >= 2).
fn left_len(n: usize) -> usize {
    debug_assert!(n >= 2);
    1usize << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Merge the chaining values of a left-complete subtree into one chaining value.
/// Recursion depth is log2(len), at most 64.
fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let l = left_len(cvs.len());
    merge_subtrees_non_root(&subtree(&cvs[..l]), &subtree(&cvs[l..]), Mode::Hash)
}

/// The root hash (content id) implied by the chaining values of a file of >= 2 chunks.
pub fn root_from_chaining_values(cvs: &[[u8; 32]]) -> Option<ContentId> {
    if cvs.len() < 2 {
        return None;
    }
    let l = left_len(cvs.len());
    let root = merge_subtrees_root(&subtree(&cvs[..l]), &subtree(&cvs[l..]), Mode::Hash);
    Some(ContentId(*root.as_bytes()))
}

/// Check that `cvs` is the right chaining-value list for a file of `size` bytes cut at
/// `chunk_size` whose content id is `content_id`.
///
/// For a file of at most one chunk the list must be empty: that file is checked whole when
/// its chunk arrives.
pub fn verify_chaining_values(
    cvs: &[[u8; 32]],
    content_id: &ContentId,
    size: u64,
    chunk_size: ChunkSize,
) -> Result<(), ChunkingError> {
    let expected = expected_chaining_values(size, chunk_size);
    if cvs.len() as u64 != expected {
        return Err(ChunkingError::WrongChainingValueCount {
            expected,
            got: cvs.len() as u64,
        });
    }
    if expected == 0 {
        return Ok(());
    }
    match root_from_chaining_values(cvs) {
        Some(root) if root == *content_id => Ok(()),
        _ => Err(ChunkingError::RootMismatch),
    }
}

/// What a verifier needs to know about one file: its content id, size, chunk size and
/// chaining values. Construct it only after [`verify_chaining_values`] passed (manifest
/// decoding does this).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// BLAKE3 of the whole file.
    pub content_id: ContentId,
    /// File size in bytes.
    pub size: u64,
    /// Chunk size.
    pub chunk_size: ChunkSize,
    /// Per-chunk chaining values; empty for a file of at most one chunk.
    pub chaining_values: Vec<[u8; 32]>,
}

impl FileSpec {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// Byte offset of chunk `index` in the file.
    pub fn chunk_offset(&self, index: u64) -> u64 {
        index.saturating_mul(self.chunk_size.bytes())
    }

    /// Length of chunk `index`, or an error past the end.
    pub fn chunk_len(&self, index: u64) -> Result<u64, ChunkingError> {
        let count = self.chunk_count();
        if index >= count {
            return Err(ChunkingError::IndexOutOfRange { index, count });
        }
        let start = self.chunk_offset(index);
        Ok((self.size - start).min(self.chunk_size.bytes()))
    }

    /// Check that the chaining values combine to the content id.
    pub fn check(&self) -> Result<(), ChunkingError> {
        verify_chaining_values(
            &self.chaining_values,
            &self.content_id,
            self.size,
            self.chunk_size,
        )
    }

    /// Verify one chunk: index in range, length, then hash. Never panics.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> Result<(), ChunkingError> {
        let expected = self.chunk_len(index)?;
        // An unchecked spec may carry a chaining-value list that does not fit its size;
        // never hash with it (an empty non-root chunk is not a valid BLAKE3 subtree).
        let want_cvs = expected_chaining_values(self.size, self.chunk_size);
        if self.chaining_values.len() as u64 != want_cvs {
            return Err(ChunkingError::WrongChainingValueCount {
                expected: want_cvs,
                got: self.chaining_values.len() as u64,
            });
        }
        if data.len() as u64 != expected {
            return Err(ChunkingError::WrongLength {
                expected,
                got: data.len() as u64,
            });
        }
        if self.chaining_values.is_empty() {
            // A file of at most one chunk: the chunk is the file.
            return if blake3::hash(data).as_bytes() == &self.content_id.0 {
                Ok(())
            } else {
                Err(ChunkingError::HashMismatch)
            };
        }
        let Some(want) = self.chaining_values.get(index as usize) else {
            return Err(ChunkingError::IndexOutOfRange {
                index,
                count: self.chaining_values.len() as u64,
            });
        };
        if &chunk_chaining_value(index, data, self.chunk_size) == want {
            Ok(())
        } else {
            Err(ChunkingError::HashMismatch)
        }
    }
}

/// Streaming hasher for publishers: feed a file's bytes in any pieces, get its content id
/// and chaining values without holding the file in memory.
#[derive(Debug)]
pub struct FileHasher {
    chunk_size: ChunkSize,
    current: blake3::Hasher,
    /// Bytes in the current chunk so far.
    filled: u64,
    index: u64,
    cvs: Vec<[u8; 32]>,
    whole: blake3::Hasher,
    size: u64,
}

impl FileHasher {
    /// A hasher for a file cut at `chunk_size`.
    pub fn new(chunk_size: ChunkSize) -> Self {
        FileHasher {
            chunk_size,
            current: blake3::Hasher::new(),
            filled: 0,
            index: 0,
            cvs: Vec::new(),
            whole: blake3::Hasher::new(),
            size: 0,
        }
    }

    /// Feed the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.filled == self.chunk_size.bytes() {
                self.close_chunk();
            }
            let room = (self.chunk_size.bytes() - self.filled) as usize;
            let take = room.min(data.len());
            self.current.update(&data[..take]);
            // Only the first chunk's bytes are needed whole: a one-chunk file is hashed whole.
            if self.index == 0 {
                self.whole.update(&data[..take]);
            }
            self.filled += take as u64;
            self.size += take as u64;
            data = &data[take..];
        }
    }

    fn close_chunk(&mut self) {
        self.cvs.push(self.current.finalize_non_root());
        self.index += 1;
        self.current = blake3::Hasher::new();
        self.current
            .set_input_offset(self.index * self.chunk_size.bytes());
        self.filled = 0;
    }

    /// Finish: the file's spec (content id, size, chunk size, chaining values).
    pub fn finish(mut self) -> FileSpec {
        if self.index == 0 {
            return FileSpec {
                content_id: ContentId(*self.whole.finalize().as_bytes()),
                size: self.size,
                chunk_size: self.chunk_size,
                chaining_values: Vec::new(),
            };
        }
        // The last chunk is never empty here: a chunk is only closed when more bytes follow.
        self.cvs.push(self.current.finalize_non_root());
        let content_id = root_from_chaining_values(&self.cvs).expect("two or more chunks");
        FileSpec {
            content_id,
            size: self.size,
            chunk_size: self.chunk_size,
            chaining_values: self.cvs,
        }
    }
}

/// Hash a whole in-memory file (tests and small files).
pub fn spec_for_bytes(data: &[u8], chunk_size: ChunkSize) -> FileSpec {
    let mut h = FileHasher::new(chunk_size);
    h.update(data);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    const C: u64 = MIN_CHUNK_SIZE as u64;

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    }

    fn cs() -> ChunkSize {
        ChunkSize::new(C).unwrap()
    }

    #[test]
    fn content_id_equals_blake3_of_whole_file() {
        let sizes = [0, 1, C - 1, C, C + 1, 7 * C + C / 2, 3 * 1024 * 1024 + 17];
        for (i, &size) in sizes.iter().enumerate() {
            let data = random_bytes(size as usize, i as u64);
            let spec = spec_for_bytes(&data, cs());
            assert_eq!(
                spec.content_id.0,
                *blake3::hash(&data).as_bytes(),
                "size {size}"
            );
            spec.check().unwrap();
            for idx in 0..spec.chunk_count() {
                let off = spec.chunk_offset(idx) as usize;
                let len = spec.chunk_len(idx).unwrap() as usize;
                spec.verify_chunk(idx, &data[off..off + len]).unwrap();
            }
        }
    }

    #[test]
    fn streaming_in_odd_pieces_matches() {
        let data = random_bytes((5 * C + 123) as usize, 9);
        let mut h = FileHasher::new(cs());
        for piece in data.chunks(777) {
            h.update(piece);
        }
        assert_eq!(h.finish(), spec_for_bytes(&data, cs()));
    }

    #[test]
    fn default_chunk_size_multi_mib() {
        let data = random_bytes(3 * 1024 * 1024 + 5, 4);
        let spec = spec_for_bytes(&data, ChunkSize::DEFAULT);
        assert_eq!(spec.chaining_values.len(), 4);
        assert_eq!(spec.content_id.0, *blake3::hash(&data).as_bytes());
        spec.check().unwrap();
    }

    #[test]
    fn rejects_flipped_bit() {
        let data = random_bytes((3 * C) as usize, 1);
        let spec = spec_for_bytes(&data, cs());
        let mut chunk = data[C as usize..2 * C as usize].to_vec();
        chunk[100] ^= 0x04;
        assert_eq!(
            spec.verify_chunk(1, &chunk),
            Err(ChunkingError::HashMismatch)
        );
        // A chunk sent at the wrong index fails too (offset is bound into the hash).
        assert_eq!(
            spec.verify_chunk(0, &data[C as usize..2 * C as usize]),
            Err(ChunkingError::HashMismatch)
        );
        // Single-chunk file: whole-file hash.
        let small = random_bytes(100, 2);
        let sspec = spec_for_bytes(&small, cs());
        let mut bad = small.clone();
        bad[0] ^= 1;
        assert_eq!(
            sspec.verify_chunk(0, &bad),
            Err(ChunkingError::HashMismatch)
        );
        sspec.verify_chunk(0, &small).unwrap();
    }

    #[test]
    fn rejects_tampered_chaining_values() {
        let data = random_bytes((7 * C + 5) as usize, 3);
        let spec = spec_for_bytes(&data, cs());
        let check =
            |cvs: &[[u8; 32]]| verify_chaining_values(cvs, &spec.content_id, spec.size, cs());
        check(&spec.chaining_values).unwrap();

        let mut swapped = spec.chaining_values.clone();
        swapped.swap(2, 3);
        assert_eq!(check(&swapped), Err(ChunkingError::RootMismatch));

        let mut missing = spec.chaining_values.clone();
        missing.pop();
        assert!(matches!(
            check(&missing),
            Err(ChunkingError::WrongChainingValueCount { .. })
        ));

        let mut extra = spec.chaining_values.clone();
        extra.push([7; 32]);
        assert!(matches!(
            check(&extra),
            Err(ChunkingError::WrongChainingValueCount { .. })
        ));

        let mut flipped = spec.chaining_values.clone();
        flipped[0][0] ^= 1;
        assert_eq!(check(&flipped), Err(ChunkingError::RootMismatch));

        // A claimed size that implies the same count but a different last chunk changes
        // nothing in the list, so the list passes, and the short chunk is caught on arrival.
        let mut lying = spec.clone();
        lying.size -= 1;
        assert!(matches!(
            lying.verify_chunk(7, &data[(7 * C) as usize..]),
            Err(ChunkingError::WrongLength { .. })
        ));
    }

    #[test]
    fn rejects_wrong_lengths_and_indices() {
        let data = random_bytes((2 * C + 10) as usize, 5);
        let spec = spec_for_bytes(&data, cs());
        // Last chunk one byte short / long.
        assert!(matches!(
            spec.verify_chunk(2, &data[(2 * C) as usize..data.len() - 1]),
            Err(ChunkingError::WrongLength { .. })
        ));
        let mut long = data[(2 * C) as usize..].to_vec();
        long.push(0);
        assert!(matches!(
            spec.verify_chunk(2, &long),
            Err(ChunkingError::WrongLength { .. })
        ));
        // A chunk longer than C.
        let too_long = vec![0u8; (C + 1) as usize];
        assert!(matches!(
            spec.verify_chunk(0, &too_long),
            Err(ChunkingError::WrongLength { .. })
        ));
        assert!(matches!(
            spec.verify_chunk(3, &[]),
            Err(ChunkingError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            spec.verify_chunk(u64::MAX, &[]),
            Err(ChunkingError::IndexOutOfRange { .. })
        ));
    }

    #[test]
    fn chunk_size_rules() {
        for bad in [
            0,
            1,
            1000,
            16 * 1024 - 1,
            16 * 1024 + 1,
            3 * 16 * 1024,
            32 * 1024 * 1024,
            u64::MAX,
        ] {
            assert_eq!(
                ChunkSize::new(bad),
                Err(ChunkingError::InvalidChunkSize(bad))
            );
        }
        for good in [16 * 1024, 64 * 1024, 1 << 20, 16 << 20] {
            ChunkSize::new(good).unwrap();
        }
        // Decoding goes through the same check.
        let bytes = postcard::to_allocvec(&3000u32).unwrap();
        assert!(postcard::from_bytes::<ChunkSize>(&bytes).is_err());
    }

    #[test]
    fn empty_file() {
        let spec = spec_for_bytes(&[], cs());
        assert_eq!(spec.content_id.0, *blake3::hash(&[]).as_bytes());
        assert_eq!(spec.chunk_count(), 1);
        assert!(spec.chaining_values.is_empty());
        spec.verify_chunk(0, &[]).unwrap();
        assert!(spec.verify_chunk(0, &[0]).is_err());
    }

    #[test]
    fn fuzz_regression_empty_file_with_chaining_values() {
        // Found by the chunk_verify fuzz target: size 0 with one chaining value made
        // verify_chunk hash an empty non-root chunk, which blake3 asserts against.
        let spec = FileSpec {
            content_id: ContentId([0; 32]),
            size: 0,
            chunk_size: cs(),
            chaining_values: vec![[0; 32]],
        };
        assert!(matches!(
            spec.verify_chunk(0, &[]),
            Err(ChunkingError::WrongChainingValueCount { .. })
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_chunks_never_panic(index in proptest::prelude::any::<u64>(), data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000), ncv in 0usize..6, size in proptest::prelude::any::<u64>()) {
            let spec = FileSpec { content_id: ContentId([1; 32]), size, chunk_size: cs(), chaining_values: vec![[2; 32]; ncv] };
            let _ = spec.verify_chunk(index, &data);
            let _ = spec.check();
        }
    }
}
